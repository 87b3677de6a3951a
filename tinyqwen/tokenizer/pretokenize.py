"""Steps 2 and 3 of the pipeline: NFC normalisation, then the split regex that cuts text into pieces.

BPE never merges across a piece boundary, so this split decides a lot: a word and the space before it stay
together, digits go one by one, punctuation runs apart from letters.

    nfc("cafe\\u0301 2025!")       'café 2025!'          "e" + combining accent composed into "é"
    pre_tokenize("café 2025!")     ['café', ' ', '2', '0', '2', '5', '!']

Both must match the reference (Hugging Face `tokenizers`) character for character, and both depend on Unicode
tables: which characters are letters (\\p{L}), numbers (\\p{N}), spaces (\\s), and which compose under NFC. The
reference's tables are older than Python's, so data/unicode_classes.json pins the reference's answers and the
private helpers below ("Unicode pinning") make the two agree on the few thousand characters where they differ.
Ordinary text never reaches that code: ASCII returns at once, and other text is checked with one regex search.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import regex

from tinyqwen.tokenizer.files import DATA_DIR, read_json

# The Qwen2 pre-tokenizer regex, verbatim from tokenizer.json. Read it as alternatives tried left to right:
#   English contractions | letters with one optional leading non-letter (" the", "(word") | ONE digit
#   | punctuation run with optional leading space | newlines with their indentation | spaces not before text | spaces
QWEN2_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


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


# ------------------------------------------------------------------------------------------ Unicode pinning


@lru_cache(maxsize=1)
def _unicode_data() -> dict:
    path = DATA_DIR / "unicode_classes.json"
    return read_json(path)


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
def _nfc_inert() -> re.Pattern:
    items = _class_items(_unicode_data()["nfc_inert"])
    return re.compile(f"([{items}])")
