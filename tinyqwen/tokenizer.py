"""The tokenizer. Text in, token ids out (and back), exactly as Qwen3 was trained.

Qwen3 uses the Qwen2 byte-level BPE: 151,643 regular tokens learned by byte-pair encoding, plus 26 added tokens
(`<|im_start|>`, `<think>`, ...) with ids 151643..151668. Encoding a string is a pipeline of small steps:

    "Hi <think>ça"
      1. added tokens, matched in the raw text    ["Hi ", <think>=151667, "ça"]
      2. NFC normalisation of the other parts     "ça" stays "ça" (a decomposed "c" + U+0327 would become "ç")
      3. the split regex ("pre-tokenizer")        ["Hi", " "], ["ça"]
      4. UTF-8 bytes, shown as printable chars    "ça" -> b"\\xc3\\xa7a" -> "Ã§a"
      5. BPE: merge adjacent symbols by rank      ["Ã", "§", "a"] -> ["Ã§", "a"] -> ["Ã§a"]
      6. look the symbols up in the vocabulary    -> ids

Decoding runs it backwards: ids -> symbols -> bytes -> UTF-8 text. One wrong id puts the model off-distribution,
so every step copies the reference (Hugging Face `tokenizers`) exactly, quirks included; tests/test_tokenizer.py
checks that on the llama.cpp vectors, a megabyte of mixed text and random Unicode strings.

    tok = Tokenizer.qwen3()                      # the copy shipped in tinyqwen/data
    tok.encode("Hello world")                    # [9707, 1879]
    tok.decode([9707, 1879])                     # 'Hello world'
    for step in tok.bpe_steps(" hello"): print(step)   # watch BPE at work
"""

from __future__ import annotations

import heapq
import json
import operator
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import regex

from tinyqwen.errors import TokenizerError

DATA_DIR = Path(__file__).resolve().parent / "data"

# The Qwen2 pre-tokenizer regex, verbatim from tokenizer.json. Read it as alternatives tried left to right:
#   English contractions | letters with one optional leading non-letter (" the", "(word") | ONE digit
#   | punctuation run with optional leading space | newlines with their indentation | spaces not before text | spaces
QWEN2_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_NO_MERGE = 1 << 62  # "rank" of a pair that has no merge: larger than any real rank
_LONG_WORD = 64  # pieces with more symbols than this use the heap merge (linear-ish instead of quadratic)
_CACHE_MAX = 200_000  # cached pieces; the cache is emptied when full (simple, and text is bursty anyway)
_CACHE_PIECE_MAX = 256  # longer pieces are not cached: they are rare and would pin memory


# ------------------------------------------------------------------------------------------ bytes <-> unicode


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


# ------------------------------------------------------------------------------------------ Unicode facts


@lru_cache(maxsize=1)
def _unicode_data() -> dict:
    path = DATA_DIR / "unicode_classes.json"
    return _read_json(path)


def _class_items(
    ranges: list[list[int]],
) -> str:  # [[65, 90], [97, 97]] -> r"\U00000041-\U0000005a\U00000061"
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


# A character's class (letter, number, space, other) decides how the split regex treats it, and nothing else
# about it does, except the literal characters ' \r \n and "strvemld" of the contractions, all ASCII. So a
# stand-in of the same class splits the same: 'x' for a letter, '0' for a number, a tab for a space.
_STAND_IN = {
    "L": "x",
    "N": "0",
    "s": "\t",
    "other": "\ue000",
}  # U+E000: private use, "other" in every version


@lru_cache(maxsize=1)
def _disputed() -> tuple[re.Pattern | None, dict[int, str]]:
    """Characters the `regex` package classifies differently from the reference, and their stand-ins.

    Which characters are letters depends on the Unicode version: `regex` 2026 knows Unicode 17, the reference's
    regex engine (Oniguruma) Unicode 16, so a brand-new letter would split differently. data/unicode_classes.json
    pins the reference's classes; here we find where `regex` disagrees (a few thousand recent characters) so
    that `pre_tokenize` can swap them for stand-ins of the reference's class.
    """
    import numpy as np  # only here: the rest of the chapter needs no arrays

    every_char = "".join(map(chr, range(0x110000)))
    pinned, theirs = {}, {}
    for name, pattern in (("L", r"\p{L}+"), ("N", r"\p{N}+"), ("s", r"\s+")):
        pinned[name] = np.zeros(0x110000, dtype=bool)  # [0x110000]
        for a, b in _unicode_data()[name]:
            pinned[name][a : b + 1] = True
        theirs[name] = np.zeros(0x110000, dtype=bool)
        for m in regex.finditer(pattern, every_char):
            theirs[name][m.start() : m.end()] = True
    differ = np.zeros(0x110000, dtype=bool)
    for name in pinned:
        differ |= pinned[name] != theirs[name]
    stand_ins = {}
    for c in np.flatnonzero(differ).tolist():
        cls = next((name for name in ("L", "N", "s") if pinned[name][c]), "other")
        stand_ins[c] = _STAND_IN[cls]
    if not stand_ins:
        return None, {}
    ranges: list[list[int]] = []
    for c in sorted(stand_ins):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return re.compile(f"[{_class_items(ranges)}]"), stand_ins


@lru_cache(maxsize=1)
def split_regex() -> regex.Pattern:
    """The compiled Qwen2 pre-tokenizer regex."""
    return regex.compile(QWEN2_SPLIT_PATTERN)


def pre_tokenize(text: str) -> list[str]:
    """Split (already normalised) text into the pieces that BPE sees one at a time (step 3).

    Digits go one by one, a space sticks to the word after it, and a run of spaces leaves its last space to
    the next word. The alternatives cover every character, so no text falls between matches.

    >>> pre_tokenize("Hello,  world 2025!\\n")
    ['Hello', ',', ' ', ' world', ' ', '2', '0', '2', '5', '!\\n']
    """
    if text.isascii():
        return split_regex().findall(text)
    disputed, stand_ins = _disputed()
    if disputed is None or disputed.search(text) is None:
        return split_regex().findall(text)
    # Rare: split a copy with stand-ins (same length), then cut the real text at the same places.
    masked = text.translate(stand_ins)
    return [text[m.start() : m.end()] for m in split_regex().finditer(masked)]


@lru_cache(maxsize=1)
def _nfc_inert() -> re.Pattern:
    items = _class_items(_unicode_data()["nfc_inert"])
    return re.compile(f"([{items}])")


def nfc(text: str) -> str:
    """NFC normalisation exactly as the reference does it (step 2).

    NFC composes "e" + U+0301 into "é", so the same visible text gets the same tokens. The reference uses older
    Unicode tables than Python's `unicodedata` for a few rare characters (combining marks of recent scripts,
    compositions added in Unicode 13 and 16): it treats them as plain characters that neither reorder nor
    compose. We get the same by normalising the text between them separately.

    >>> nfc("e\\u0301"), nfc("\\U00011935\\U00011930") == "\\U00011935\\U00011930"
    ('é', True)
    """
    if text.isascii():
        return text  # ASCII is always NFC; the common case costs nothing
    inert = _nfc_inert()
    if inert.search(text) is None:
        return unicodedata.normalize("NFC", text)
    # split() with a capturing group keeps each inert character as its own part
    return "".join(unicodedata.normalize("NFC", part) for part in inert.split(text))


# ------------------------------------------------------------------------------------------ BPE


def merge_symbols(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one piece: merge the adjacent pair with the lowest rank, leftmost first, until no
    adjacent pair has a merge (step 5). One merge at a time, exactly like the reference.

    >>> ranks = {("l", "l"): 0, ("h", "e"): 1, ("he", "ll"): 2, ("hell", "o"): 3}
    >>> merge_symbols(list("hello"), ranks)
    ['hello']
    >>> merge_symbols(list("hallo"), ranks)
    ['h', 'a', 'll', 'o']
    """
    if len(symbols) > _LONG_WORD:
        return _merge_symbols_heap(symbols, ranks)
    symbols = list(symbols)
    get = ranks.get
    pair_ranks = [get(pair, _NO_MERGE) for pair in pairwise(symbols)]  # [i]: (sym[i], sym[i+1])
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        i = pair_ranks.index(best)  # leftmost of the lowest rank
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get((symbols[i - 1], symbols[i]), _NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = get((symbols[i], symbols[i + 1]), _NO_MERGE)
    return symbols


def _merge_symbols_heap(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """`merge_symbols` for long pieces: a heap of (rank, position) and a linked list of symbols.

    The list version rescans every pair after each merge (quadratic); a run of 10,000 spaces would take seconds.
    This is the reference's own algorithm; heap entries made stale by an earlier merge are skipped when popped.
    """
    sym: list[str | None] = list(symbols)
    nxt = [*range(1, len(sym)), -1]
    prv = list(range(-1, len(sym) - 1))
    heap = []  # (rank, position of the left symbol, merged text): pops lowest rank, then leftmost
    for i in range(len(sym) - 1):
        r = ranks.get((sym[i], sym[i + 1]))
        if r is not None:
            heap.append((r, i, sym[i] + sym[i + 1]))
    heapq.heapify(heap)
    while heap:
        rank, i, merged = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] is None or j == -1 or sym[i] + sym[j] != merged:
            continue  # stale: one side was merged into something else since this entry was pushed
        sym[i], sym[j] = merged, None
        nxt[i] = nxt[j]
        if nxt[j] != -1:
            prv[nxt[j]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if left != -1 and right != -1:
                r = ranks.get((sym[left], sym[right]))
                if r is not None:
                    heapq.heappush(heap, (r, left, sym[left] + sym[right]))
    out, i = [], 0
    while i != -1:
        out.append(sym[i])
        i = nxt[i]
    return out


@dataclass(frozen=True)
class MergeStep:
    """One BPE merge of `Tokenizer.bpe_steps`: which pair merged, its rank, and the symbols afterwards."""

    rank: int
    pair: tuple[str, str]
    symbols: tuple[str, ...]

    def __str__(self) -> str:
        return f"rank {self.rank:>6}: {self.pair[0]!r} + {self.pair[1]!r} -> {' '.join(self.symbols)}"


# ------------------------------------------------------------------------------------------ streaming decode


def incomplete_utf8_tail(buf: bytes | bytearray) -> int:
    """How many bytes at the end of `buf` are the start of a UTF-8 character still waiting for its other bytes.

    A character takes 1 to 4 bytes and a token may end in the middle of one (an emoji is often split over two
    tokens). Those bytes must be held back, not shown as "�". Bytes that can never become valid are not held:
    they decode to "�" now, exactly as they would in the full text.

    >>> "😀".encode()
    b'\\xf0\\x9f\\x98\\x80'
    >>> incomplete_utf8_tail(b"ok\\xf0\\x9f\\x98"), incomplete_utf8_tail(b"ok\\xf0\\x9f\\x98\\x80")
    (3, 0)
    >>> incomplete_utf8_tail(b"\\xe0\\x80")  # E0 must be followed by A0..BF: invalid already, nothing to wait for
    0
    """
    for k in range(1, min(3, len(buf)) + 1):
        lead = buf[-k]
        if lead < 0x80:
            return 0  # ASCII: everything before and including it is complete
        if lead < 0xC0:
            continue  # a continuation byte: look further back for the lead byte
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if lead < 0xC2 or lead > 0xF4 or k >= need:
            return 0  # an impossible lead byte, or the character is already complete
        if (
            k >= 2
        ):  # the second byte's allowed range depends on the lead (no overlongs, surrogates, > U+10FFFF)
            lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
                lead, (0x80, 0xBF)
            )
            if not lo <= buf[-k + 1] <= hi:
                return 0
        return k
    return 0


class StreamDecoder:
    """Turns token ids into text as they arrive, never emitting half a character.

    >>> tok = Tokenizer.qwen3()
    >>> ids = tok.encode("hi 😁")  # the emoji's 4 bytes are split over two tokens
    >>> ids, [tok.decode([i]) for i in ids]
    ([6023, 26525, 223], ['hi', ' �', '�'])
    >>> stream = tok.stream_decoder()
    >>> [stream.push(i) for i in ids] + [stream.flush()]
    ['hi', ' ', '😁', '']
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._pending = bytearray()

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete (possibly "")."""
        self._pending += self._tokenizer._token_bytes(token_id, self._skip_special)
        ready = len(self._pending) - incomplete_utf8_tail(self._pending)
        text = self._pending[:ready].decode("utf-8", errors="replace")
        del self._pending[:ready]
        return text

    def flush(self) -> str:
        """End of stream: whatever is held back, with "�" for an unfinished character."""
        text = self._pending.decode("utf-8", errors="replace")
        self._pending.clear()
        return text


# ------------------------------------------------------------------------------------------ loading


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _parse_vocab(obj, where: str) -> dict[str, int]:
    if not isinstance(obj, dict) or not obj:
        raise TokenizerError(f"{where}: the vocabulary must be a non-empty JSON object of token -> id")
    seen: dict[int, str] = {}
    for token, i in obj.items():
        if type(i) is not int or i < 0:
            raise TokenizerError(f"{where}: token {token!r} has id {i!r}; ids must be integers >= 0")
        if i in seen:
            raise TokenizerError(f"{where}: id {i} is used by both {seen[i]!r} and {token!r}")
        seen[i] = token
    return dict(obj)


Merges = tuple[list[tuple[str, str]], Callable[[int], str]]  # pairs in rank order; rank -> "file line N"


def _read_merges_txt(path: Path) -> Merges:
    """merges.txt: an optional "#version" line, then one "left right" pair per line, best (rank 0) first."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    pairs, numbers = [], []
    for number, line in enumerate(lines, start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"{path} line {number}: expected two tokens separated by one space, got {line!r}"
            )
        pairs.append((parts[0], parts[1]))
        numbers.append(number)
    if not pairs:
        raise TokenizerError(f"{path}: no merges found")
    return pairs, lambda rank: f"{path} line {numbers[rank]}"


def _json_merges(obj, where: str) -> Merges:
    if not isinstance(obj, list):
        raise TokenizerError(f"{where}: model.merges must be a list")
    pairs = []
    for k, m in enumerate(obj):
        if isinstance(m, str):  # older files write "left right"
            m = m.split(" ")
        if not (isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) and s for s in m)):
            raise TokenizerError(f"{where}: model.merges[{k}] is {m!r}; expected two non-empty tokens")
        pairs.append((m[0], m[1]))
    return pairs, lambda rank: f"{where} model.merges[{rank}]"


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole in the raw text, before normalisation and splitting. `special` ones are dropped
    by `decode(..., skip_special_tokens=True)`; the others (`<think>`, `<tool_call>`, ...) never are."""

    id: int
    content: str
    special: bool


def _parse_added(entries: list[tuple[int, dict]], where: str) -> list[AddedToken]:
    added = []
    for i, entry in entries:
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not content:
            raise TokenizerError(f"{where}: added token {i} has no 'content' string")
        for flag in ("lstrip", "rstrip", "single_word", "normalized"):
            if entry.get(flag, False):
                raise TokenizerError(
                    f"{where}: added token {content!r} has {flag}=true; tinyqwen supports the Qwen layout, "
                    "where all of lstrip, rstrip, single_word and normalized are false"
                )
        added.append(AddedToken(i, content, bool(entry.get("special", False))))
    return added


def _expect(where: str, what: str, got, want) -> None:
    if got != want:
        raise TokenizerError(
            f"{where}: {what} is {json.dumps(got)[:200]}; expected {json.dumps(want)[:200]} "
            "(tinyqwen implements the Qwen2/Qwen3 byte-level BPE pipeline only)"
        )


def _check_pipeline(tj: dict, where: str) -> None:
    """Refuse a tokenizer.json whose pipeline is not the one implemented here, rather than tokenize wrongly."""
    model = tj.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"{where}: no 'model' object")
    _expect(where, "model.type", model.get("type"), "BPE")
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(
                f"{where}: model.{key} is {model[key]!r}; tinyqwen supports only an empty value"
            )
    for key in ("byte_fallback", "ignore_merges"):
        if model.get(key):
            raise TokenizerError(f"{where}: model.{key} is true; tinyqwen supports only false")
    _expect(where, "normalizer", tj.get("normalizer"), {"type": "NFC"})
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2:
        _expect(where, "pre_tokenizer", pre, "Sequence of Split(Qwen2 regex) and ByteLevel")
    split, byte_level = steps
    _expect(where, "pre_tokenizer Split", split, {
        "type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False,
    })  # fmt: skip
    _expect(where, "pre_tokenizer ByteLevel type", byte_level.get("type"), "ByteLevel")
    _expect(where, "pre_tokenizer ByteLevel.use_regex", byte_level.get("use_regex"), False)
    _expect(where, "pre_tokenizer ByteLevel.add_prefix_space", byte_level.get("add_prefix_space"), False)
    _expect(where, "decoder type", (tj.get("decoder") or {}).get("type"), "ByteLevel")


def _token_content(
    value,
) -> str | None:  # tokenizer_config writes "<|im_end|>" or {"content": "<|im_end|>", ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------ the tokenizer


class Tokenizer:
    """Qwen2/Qwen3 byte-level BPE tokenizer, written from scratch, id for id the same as the reference.

    Build one with `Tokenizer.from_pretrained(folder)` or `Tokenizer.qwen3()`.

    >>> tok = Tokenizer.qwen3()
    >>> tok.encode("<|im_start|>user\\nHi!<|im_end|>")
    [151644, 872, 198, 13048, 0, 151645]
    >>> tok.decode([151644, 872, 198, 13048, 0, 151645], skip_special_tokens=True)
    'user\\nHi!'
    >>> len(tok), tok.eos_token_id, tok.pad_token_id, tok.token_to_id("<think>")
    (151669, 151645, 151643, 151667)
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Merges,
        added: list[AddedToken],
        eos_token: str | None = None,
        pad_token: str | None = None,
        source: str = "<memory>",
    ):
        """`merges`: the (left, right) pairs in rank order, and rank -> where it came from (for error messages)."""
        byte_symbols = set(bytes_to_unicode().values())
        missing = sorted(byte_symbols - vocab.keys())
        if missing:
            raise TokenizerError(
                f"{source}: the vocabulary lacks byte symbol(s) {missing[:5]}; all 256 are needed"
            )
        pairs, origin = merges
        self.ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(pairs)}
        for rank, (left, right) in enumerate(pairs):
            if (
                left not in vocab
                or right not in vocab
                or left + right not in vocab
                or self.ranks[left, right] != rank
            ):
                part = next((p for p in (left, right, left + right) if p not in vocab), None)
                if part is None:
                    raise TokenizerError(
                        f"{origin(rank)}: merge {left!r} {right!r} appears again at {origin(self.ranks[left, right])}"
                    )
                raise TokenizerError(
                    f"{origin(rank)}: token {part!r} of merge {left!r} {right!r} is not in the vocabulary"
                )
        self.vocab = vocab
        self.added_tokens: dict[str, AddedToken] = {}
        for token in added:
            if token.content in vocab and vocab[token.content] != token.id:
                raise TokenizerError(
                    f"{source}: added token {token.content!r} has id {token.id} but the vocabulary says "
                    f"{vocab[token.content]}"
                )
            self.added_tokens[token.content] = token
        size = max([*vocab.values(), *(t.id for t in added)]) + 1
        id_to_token: list[str | None] = [None] * size
        for token, i in vocab.items():
            id_to_token[i] = token
        for token in added:
            id_to_token[token.id] = token.content
        if None in id_to_token:
            gap = id_to_token.index(None)
            raise TokenizerError(f"{source}: no token has id {gap}, but ids go up to {size - 1}")
        self._id_to_token: list[str] = id_to_token  # type: ignore[assignment]
        self._id_bytes = [self._bytes_of(i) for i in range(size)]
        self._special_ids = {t.id for t in added if t.special}
        self.eos_token_id = self._config_token_id(eos_token, "eos_token", source)
        self.pad_token_id = self._config_token_id(pad_token, "pad_token", source)
        # Added tokens are found in the raw text with leftmost-longest matching, like the reference: at the first
        # position where any matches, the longest wins. Sorting longest first makes a regex alternation do that.
        contents = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._cache: dict[str, tuple[int, ...]] = {}

    def _config_token_id(self, content: str | None, key: str, source: str) -> int | None:
        if content is None:
            return None
        i = self.token_to_id(content)
        if i is None:
            raise TokenizerError(f"{source}: {key} {content!r} is not a token of this vocabulary")
        return i

    def _bytes_of(self, i: int) -> bytes:
        # As the reference's ByteLevel decoder: a token made only of byte stand-ins gives those bytes, any other
        # token (an added token such as "<think>" happens to be both) its UTF-8 text.
        token = self._id_to_token[i]
        raw = symbols_to_bytes(token)
        return raw if raw is not None else token.encode("utf-8")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json.

        tokenizer.json wins when both are present; tokenizer_config.json, when present, names eos and pad.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a directory (expected a folder with the tokenizer files)")
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else None
        if config is not None and not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")
        if (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder / "tokenizer.json", config)
        needed = ("vocab.json", "merges.txt", "tokenizer_config.json")
        if not all((folder / name).is_file() for name in needed):
            missing = [name for name in needed if not (folder / name).is_file()]
            raise TokenizerError(
                f"{folder}: no tokenizer found: looked for tokenizer.json, or vocab.json + merges.txt + "
                f"tokenizer_config.json (missing: {', '.join(missing)})"
            )
        return cls._from_vocab_merges(folder, config)

    @classmethod
    def qwen3(cls) -> Tokenizer:
        """The official Qwen3 tokenizer shipped inside the package (works offline)."""
        return _packaged_qwen3()

    @classmethod
    def _from_tokenizer_json(cls, path: Path, config: dict | None) -> Tokenizer:
        tj = _read_json(path)
        if not isinstance(tj, dict):
            raise TokenizerError(f"{path}: expected a JSON object")
        _check_pipeline(tj, str(path))
        vocab = _parse_vocab(tj["model"].get("vocab"), f"{path} model.vocab")
        merges = _json_merges(tj["model"].get("merges"), str(path))
        entries = tj.get("added_tokens") or []
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and type(e.get("id")) is int for e in entries
        ):
            raise TokenizerError(f"{path}: added_tokens must be a list of objects with an integer 'id'")
        added = _parse_added([(e["id"], e) for e in entries], f"{path} added_tokens")
        config = config or {}
        eos, pad = _token_content(config.get("eos_token")), _token_content(config.get("pad_token"))
        return cls(vocab, merges, added, eos, pad, source=str(path))

    @classmethod
    def _from_vocab_merges(cls, folder: Path, config: dict) -> Tokenizer:
        config_path = folder / "tokenizer_config.json"
        vocab = _parse_vocab(_read_json(folder / "vocab.json"), str(folder / "vocab.json"))
        merges = _read_merges_txt(folder / "merges.txt")
        decoder = config.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict) or not all(str(k).isdigit() for k in decoder):
            raise TokenizerError(
                f"{config_path}: added_tokens_decoder must map ids (as strings) to token objects"
            )
        entries = sorted((int(k), v) for k, v in decoder.items())
        added = _parse_added(entries, f"{config_path} added_tokens_decoder")
        eos, pad = _token_content(config.get("eos_token")), _token_content(config.get("pad_token"))
        return cls(vocab, merges, added, eos, pad, source=str(folder))

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of tokens (151,669 for Qwen3). The model's 151,936 embedding rows include unused padding."""
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """All added tokens, content -> id: the strings recognised whole inside text (special or not)."""
        return {content: t.id for content, t in self.added_tokens.items()}

    def token_to_id(self, token: str) -> int | None:
        """Id of a token written as the vocabulary writes it (byte stand-ins: " hi" is "Ġhi"), or None."""
        added = self.added_tokens.get(token)
        return added.id if added is not None else self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str:
        """The token string of an id, as the vocabulary writes it."""
        return self._id_to_token[self._check_id(token_id)]

    def _check_id(self, token_id) -> int:
        try:
            i = operator.index(token_id)  # int, numpy integer; not float or str
        except TypeError:
            raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < len(self._id_to_token):
            raise TokenizerError(
                f"token id {i} is outside the vocabulary [0, {len(self._id_to_token)}) of {len(self._id_to_token)} "
                "tokens (the model's extra embedding rows are padding, not tokens)"
            )
        return i

    # ---------------------------------------------------------------- encode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. No BOS is added (Qwen has none); added tokens written in the text are recognised.

        >>> tok = Tokenizer.qwen3()
        >>> tok.encode("Hello world"), tok.encode("<think>\\n\\n</think>")
        ([9707, 1879], [151667, 271, 151668])
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        start = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                if m.start() > start:
                    self._encode_ordinary(text[start : m.start()], ids, start)
                ids.append(self.added_tokens[m.group()].id)
                start = m.end()
        if start < len(text):
            self._encode_ordinary(text[start:], ids, start)
        return ids

    def _encode_ordinary(self, segment: str, ids: list[int], offset: int) -> None:
        """Steps 2-6 for a stretch of text without added tokens; appends to `ids`."""
        cache, vocab, ranks = self._cache, self.vocab, self.ranks
        for piece in pre_tokenize(nfc(segment)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                try:
                    symbols = text_to_symbols(piece)
                except (
                    UnicodeEncodeError
                ) as e:  # a lone surrogate: not Unicode text, and not encodable to UTF-8
                    where = offset + segment.find(piece[e.start])
                    raise TokenizerError(
                        f"text contains a lone surrogate {piece[e.start]!r} near index {where}; it is not valid Unicode"
                    ) from None
                piece_ids = tuple(vocab[s] for s in merge_symbols(list(symbols), ranks))
                if len(piece) <= _CACHE_PIECE_MAX:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[piece] = piece_ids
            ids.extend(piece_ids)

    def bpe_steps(self, word: str) -> list[MergeStep]:
        """Every merge BPE makes on one pre-tokenized piece, in order: the teaching view of step 5.

        Symbols are bytes written with their stand-ins ("Ġ" is a space). Each step merges the adjacent pair with
        the lowest rank (its line in merges.txt), leftmost first, until no adjacent pair is in merges.txt.

        >>> tok = Tokenizer.qwen3()
        >>> for step in tok.bpe_steps(" hello"):
        ...     print(step)
        rank     45: 'e' + 'l' -> Ġ h el l o
        rank     49: 'Ġ' + 'h' -> Ġh el l o
        rank    129: 'l' + 'o' -> Ġh el lo
        rank   4535: 'el' + 'lo' -> Ġh ello
        rank  23555: 'Ġh' + 'ello' -> Ġhello
        >>> tok.token_to_id("Ġhello"), tok.encode(" hello")
        (23811, [23811])
        """
        symbols = list(text_to_symbols(word))
        steps = []
        while len(symbols) > 1:
            pair_ranks = [self.ranks.get(pair, _NO_MERGE) for pair in pairwise(symbols)]
            best = min(pair_ranks)
            if best == _NO_MERGE:
                break
            i = pair_ranks.index(best)
            pair = (symbols[i], symbols[i + 1])
            symbols[i : i + 2] = [pair[0] + pair[1]]
            steps.append(MergeStep(best, pair, tuple(symbols)))
        return steps

    # ---------------------------------------------------------------- decode

    def _token_bytes(self, token_id, skip_special: bool) -> bytes:
        # An id past the last token decodes to nothing, as in transformers. Qwen3's embedding has 151,936 rows for
        # 151,669 tokens, and a random or fine-tuned model can choose one of the spare rows: that must not make a
        # whole reply (or a batch of them) undecodable. Negative or non-integer ids are still errors.
        try:
            if operator.index(token_id) >= len(self._id_bytes):
                return b""
        except TypeError:
            pass  # not an integer: _check_id says so
        i = self._check_id(token_id)
        return b"" if skip_special and i in self._special_ids else self._id_bytes[i]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids. Bytes that are not valid UTF-8 become "�" (U+FFFD), one per maximal invalid run,
        as the reference does. `skip_special_tokens` drops the special added tokens (not `<think>` & co). Ids past
        the vocabulary (a model's spare embedding rows, 151669 and up for Qwen3) decode to "", as in transformers.

        >>> tok = Tokenizer.qwen3()
        >>> tok.decode([9707, 1879, 151645]), tok.decode([9707, 151645], skip_special_tokens=True)
        ('Hello world<|im_end|>', 'Hello')
        >>> tok.decode([26525])  # the first 3 bytes of an emoji, alone
        ' �'
        >>> tok.decode([9707, 151700, 1879])
        'Hello world'
        """
        if isinstance(ids, (str, bytes)):
            raise TokenizerError(f"decode expects a sequence of token ids, got {type(ids).__name__}")
        try:
            ids = list(ids)
        except TypeError:
            raise TokenizerError(
                f"decode expects a sequence of token ids, got {type(ids).__name__}"
            ) from None
        raw = b"".join([self._token_bytes(i, skip_special_tokens) for i in ids])
        return raw.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A `StreamDecoder` for showing generated text token by token."""
        return StreamDecoder(self, skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.ranks)}, added={len(self.added_tokens)})"


@lru_cache(maxsize=1)
def _packaged_qwen3() -> Tokenizer:
    # One shared instance: loading takes about a second. Tokenizer state is only the piece cache, which is safe
    # to share.
    return Tokenizer.from_pretrained(DATA_DIR)
