"""Step 4 of the pipeline: text as UTF-8 bytes, each byte written as one printable character.

Byte-level BPE learns its merges over bytes, so any text (any script, emoji, even invalid UTF-8) can be written with
256 base symbols and no "unknown" token. The merges and the vocabulary are stored as strings, though, so each byte
gets a printable stand-in (GPT-2's table, used unchanged by Qwen): "A" is "A", a space is "Ġ", a newline "Ċ".

    " ça"  ->  UTF-8 b" \\xc3\\xa7a"  ->  "ĠÃ§a"      (text_to_symbols)
    "ĠÃ§a" ->  b" \\xc3\\xa7a"                         (symbols_to_bytes, for decoding)
"""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to 256 printable characters.

    BPE works on strings, but its alphabet must be bytes so that any text (any script, emoji, invalid UTF-8)
    can be written with 256 base symbols. Printable Latin-1 bytes stand for themselves; the other 68 (control
    characters, space, ...) are shifted to U+0100 and up, in byte order. That is why a space shows as "Ġ".

    >>> table = bytes_to_unicode()
    >>> table[ord("A")], table[ord(" ")], table[ord("\\n")], len(set(table.values()))
    ('A', 'Ġ', 'Ċ', 256)
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


def _byte_translation() -> dict[int, str]:  # for str.translate on a latin-1 view of the bytes (fast path)
    return dict(bytes_to_unicode())


_TO_SYMBOLS = _byte_translation()
_FROM_SYMBOLS = {ord(ch): b for b, ch in bytes_to_unicode().items()}
_NOT_A_SYMBOL = re.compile("[^" + re.escape("".join(bytes_to_unicode().values())) + "]")


def text_to_symbols(text: str) -> str:
    """UTF-8 bytes of `text`, each written as its printable stand-in (step 4 of the pipeline).

    >>> text_to_symbols(" ça")
    'ĠÃ§a'
    """
    # latin-1 maps byte b to chr(b) one to one, so translate() can do the byte -> symbol lookup in C
    return text.encode("utf-8").decode("latin-1").translate(_TO_SYMBOLS)


def symbols_to_bytes(symbols: str) -> bytes | None:
    """The inverse of `text_to_symbols` on bytes; None when a character is not one of the 256 stand-ins.

    >>> symbols_to_bytes("ĠÃ§a")
    b' \\xc3\\xa7a'
    """
    if _NOT_A_SYMBOL.search(symbols):
        return None
    return symbols.translate(_FROM_SYMBOLS).encode("latin-1")
