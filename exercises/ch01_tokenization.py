"""Chapter 1 exercises: the Qwen3 tokenizer, from bytes to ids and back.

Fill in each function in order (the notebook, notebooks/01-tokenization.ipynb, builds them in the same order), then
run `pytest exercises/test_ch01_tokenization.py`. Replace each `raise NotImplementedError` with your code.

The tests hand you the official Qwen3 files already parsed, so you can concentrate on the algorithm:

    vocab        dict[str, int]              151,643 regular tokens, written in byte stand-ins: {"Ġhello": 23811, ...}
    ranks        dict[tuple[str, str], int]  merges.txt: ("Ġ", "h") -> its line number among the merges (0 = first)
    added        dict[str, int]              the 26 added tokens: {"<|im_start|>": 151644, "<think>": 151667, ...}
    id_to_token  dict[int, str]              every id (regular and added) -> its token string

You may use the standard library, NumPy and the `regex` package (`import regex`; unlike `re` it knows `\\p{L}`).
Do not import tinyqwen here: these functions are yours.
"""

from __future__ import annotations

# The Qwen2/Qwen3 pre-tokenizer regex, copied verbatim from the official tokenizer.json.
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's, used unchanged by Qwen).

    Returns a dict with 256 entries, one per byte value 0..255, mapping to 256 distinct one-character strings.
    Bytes that are printable Latin-1 characters ("!".."~", "¡".."¬", "®".."ÿ") map to themselves; the 68 others
    (control bytes, space, 0x7F..0xA0, 0xAD) map to chr(256), chr(257), ... in increasing byte order.

    >>> table = bytes_to_unicode()
    >>> table[ord("A")], table[ord(" ")], table[ord("\\n")], table[0xE4], len(set(table.values()))
    ('A', 'Ġ', 'Ċ', 'ä', 256)
    """
    raise NotImplementedError


def to_symbols(text: str) -> str:
    """The UTF-8 bytes of `text`, each written as its stand-in from `bytes_to_unicode()`.

    The result has one character per BYTE (not per character of `text`): "ç" is two bytes, C3 A7.

    >>> to_symbols(" ça")
    'ĠÃ§a'
    >>> to_symbols("中")      # E4 B8 AD
    'ä¸Ń'
    """
    raise NotImplementedError


def pretokenize(text: str) -> list[str]:
    """Split text into the pieces BPE sees one at a time, with SPLIT_PATTERN (every match, in order).

    Nothing is dropped: "".join(pieces) == text. Digits come one at a time; a space sticks to the word after it.

    >>> pretokenize("Hello,  world 2025!\\n")
    ['Hello', ',', ' ', ' world', ' ', '2', '0', '2', '5', '!\\n']
    """
    raise NotImplementedError


def bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one piece: start from its single characters and repeatedly merge the adjacent pair
    with the LOWEST rank (leftmost if that pair occurs twice), until no adjacent pair is in `ranks`.

    `symbols` is a piece already written in stand-ins (`to_symbols(piece)`); returns the final symbols.

    >>> ranks = {("l", "l"): 0, ("h", "e"): 1, ("he", "ll"): 2, ("hell", "o"): 3}
    >>> bpe("hello", ranks)      # l+l (rank 0), then h+e (1), he+ll (2), hell+o (3)
    ['hello']
    >>> bpe("hallo", ranks)      # only l+l applies
    ['h', 'a', 'll', 'o']
    """
    raise NotImplementedError


def encode_ordinary(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """Ids of text that holds no added tokens: NFC-normalise, split with the regex, turn each piece into byte
    symbols, BPE them, and look each resulting symbol up in `vocab`.

    (Use `unicodedata.normalize("NFC", text)`. Tip: the same piece comes back again and again in real text;
    caching `piece -> ids` in a dict makes long texts much faster.)

    >>> encode_ordinary("Hello world", vocab, ranks)
    [9707, 1879]
    >>> encode_ordinary("cafe\\u0301", vocab, ranks)    # "e" + combining acute: NFC makes it "é" first
    [924, 58858]
    """
    raise NotImplementedError


def encode(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], added: dict[str, int]
) -> list[int]:
    """Ids of any text: added tokens written in the text ("<|im_start|>", "<think>", ...) are found FIRST, in the
    raw text, and become their own id; the stretches between them go through `encode_ordinary`.

    Where two added tokens could match at the same place, the longer one wins.

    >>> encode("<|im_start|>user\\nHi!<|im_end|>", vocab, ranks, added)
    [151644, 872, 198, 13048, 0, 151645]
    """
    raise NotImplementedError


def decode(ids: list[int], id_to_token: dict[int, str]) -> str:
    """Text of token ids: each token's stand-in characters back to bytes, all bytes joined, then decoded as UTF-8
    with errors="replace" (bytes that are not valid UTF-8 become "�").

    A token whose characters are not all stand-ins (none in Qwen3, but be safe) contributes its UTF-8 text.

    >>> decode([9707, 1879, 151645], id_to_token)
    'Hello world<|im_end|>'
    >>> decode([26525], id_to_token)    # 3 of the 4 bytes of an emoji
    ' �'
    """
    raise NotImplementedError


def stream_decode(ids: list[int], id_to_token: dict[int, str]) -> list[str]:
    """Decode ids one at a time as a generator produces them, never showing half a character.

    Returns len(ids) + 1 strings: after each id, the text that has become complete (possibly ""); last, what a
    final flush gives (the held-back bytes, "�" for an unfinished character, usually ""). Hold back only bytes
    that could still become a valid character; their join equals `decode(ids, id_to_token)`.

    >>> stream_decode([6023, 26525, 223], id_to_token)    # "hi 😁": the emoji is split over two tokens
    ['hi', ' ', '😁', '']
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------- extension: train a BPE


def train_bpe(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges from `text`: the merges, in the order learned (rank 0 first).

    `vocab_size` counts the 256 byte symbols, the special tokens and the merges, so you learn
    vocab_size - 256 - len(special_tokens) merges (fewer if no adjacent pair is left).

    1. Cut the special tokens out of the text (no merge may span one), NFC-normalise each part
       (`unicodedata.normalize("NFC", part)`), `pretokenize` it and count how often each piece occurs; write each
       distinct piece as a tuple of byte symbols (`to_symbols`).
    2. Repeat: find the adjacent pair of symbols that occurs most often, summed over all pieces (a piece that
       occurs 5 times counts 5 times); merge it everywhere (left to right, so "a a a" becomes "aa a"); write it
       down.
    3. Ties: among pairs of equal count take the one that sorts first as a tuple of strings, min((a, b), ...):
       ("a", "b") before ("a", "c") before ("b", "a").

    Recounting every pair of every piece after each merge is correct but slow (~10 s on 130 kB of English).
    A merge only changes the pieces that contain the pair: keep the pair counts, and for each such piece
    subtract its old pairs and add its new ones (a dict pair -> set of pieces finds them); find the top pair
    with a heap of (-count, pair) whose entries you push again when a count changes, skipping popped entries
    whose count is out of date. Target: well under 1.5 s for 130 kB and vocab_size 500.

    >>> train_bpe("aaab aaab", 258, [])   # pieces "aaab", " aaab": a+a 4×; then aa+a and a+b 2× each -> the tie
    [('a', 'a'), ('a', 'b')]
    """
    raise NotImplementedError
