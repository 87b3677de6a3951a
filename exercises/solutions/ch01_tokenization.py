"""Chapter 1 solutions: Qwen3's byte-level BPE tokenizer written out with the standard library and `regex`
(tinyqwen/tokenizer/ is the library's version, with a faster merge loop and many more checks)."""

from __future__ import annotations

import codecs
import unicodedata

import regex

# The Qwen2/Qwen3 pre-tokenizer regex, verbatim from the official tokenizer.json.
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT = regex.compile(SPLIT_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    # the printable Latin-1 bytes stand for themselves; the other 68 get chr(256), chr(257), ... in byte order,
    # so every byte has a visible one-character stand-in (a vocab file can then be plain text)
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_SYMBOL = bytes_to_unicode()
_SYMBOL_TO_BYTE = {s: b for b, s in _BYTE_TO_SYMBOL.items()}


def to_symbols(text: str) -> str:
    return "".join(_BYTE_TO_SYMBOL[b] for b in text.encode("utf-8"))  # one stand-in per BYTE


def pretokenize(text: str) -> list[str]:
    return _SPLIT.findall(text)  # every match in order; together they are the whole text


def bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(symbols)  # start from single characters (bytes)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        known = [(rank, i) for rank, i in pairs if rank is not None]
        if not known:
            break
        rank, _ = min(known)  # the lowest rank: the merge that was learned first
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence of that pair, left to right
            if i + 1 < len(parts) and ranks.get((parts[i], parts[i + 1])) == rank:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def encode_ordinary(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    text = unicodedata.normalize("NFC", text)  # Qwen's normalizer: "e" + combining accent becomes "é" first
    cache: dict[str, list[int]] = {}  # the same piece comes back again and again in real text
    ids: list[int] = []
    for piece in pretokenize(text):
        if piece not in cache:
            cache[piece] = [vocab[s] for s in bpe(to_symbols(piece), ranks)]
        ids += cache[piece]
    return ids


def encode(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], added: dict[str, int]
) -> list[int]:
    if not added:
        return encode_ordinary(text, vocab, ranks)
    # added tokens are found in the RAW text, before normalisation and splitting; sorting the alternatives
    # longest first makes the regex prefer the longer of two tokens that start at the same place
    specials = regex.compile("|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)))
    ids: list[int] = []
    start = 0
    for match in specials.finditer(text):
        ids += encode_ordinary(text[start : match.start()], vocab, ranks)
        ids.append(added[match.group()])
        start = match.end()
    return ids + encode_ordinary(text[start:], vocab, ranks)


def _token_bytes(token: str) -> bytes:
    if all(ch in _SYMBOL_TO_BYTE for ch in token):
        return bytes(_SYMBOL_TO_BYTE[ch] for ch in token)  # stand-ins back to their bytes
    return token.encode("utf-8")  # an added token such as "<|im_end|>" is written as itself


def decode(ids: list[int], id_to_token: dict[int, str]) -> str:
    # join the BYTES first, decode once: a character split over two tokens comes back whole
    return b"".join(_token_bytes(id_to_token[i]) for i in ids).decode("utf-8", errors="replace")


def stream_decode(ids: list[int], id_to_token: dict[int, str]) -> list[str]:
    # Python's incremental UTF-8 decoder holds back exactly the bytes that could still become a character
    # and turns bytes that never can into "�" at once, as decoding the whole text would
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(_token_bytes(id_to_token[i])) for i in ids] + [decoder.decode(b"", final=True)]
