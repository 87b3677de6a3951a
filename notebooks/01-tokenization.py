# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1 · Tokenization
#
# A language model never sees text. It sees a list of integers, one per *token*, and it predicts the next integer.
# The tokenizer turns text into those integers and back. It is the only part of Qwen3 with no learned weights
# that run at inference time, and yet it can break the model completely. If one id differs from the ids the model
# was trained on, the model is fed an input it has never seen. Nothing crashes: the answers just get worse, and
# nobody notices why.
#
# In this chapter we write the Qwen3 tokenizer from scratch, with the standard library and the `regex` package.
# We check it id for id against the official one. These are the steps:
#
# 1. **bytes**: any text is a sequence of UTF-8 bytes, and each byte gets a printable stand-in character;
# 2. **the pre-tokenizer regex** cuts text into pieces (words, single digits, punctuation runs, whitespace);
# 3. **BPE** merges the bytes of each piece into tokens, in the order of the 151,387 lines of `merges.txt`;
# 4. **NFC** normalisation, so the same visible text always gives the same ids;
# 5. **added tokens** such as `<|im_start|>` and `<think>`, found in the raw text before anything else;
# 6. **decoding**, including *streaming* decoding of an emoji split over two tokens.
#
# At the end, your encoder runs on a real chat prompt, and its ids go into a real-vocabulary Qwen3 model. The ids
# and the model's logits must equal what the official tokenizer and `transformers` produce.

# %%
import codecs
import json
import unicodedata
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import regex  # like `re`, but it knows Unicode classes such as \p{L} (any letter)

from course_setup import REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
DATA = REPO / "tinyqwen" / "data"  # the official Qwen3 tokenizer files, byte for byte
REFERENCE = json.loads((REPO / "exercises" / "references" / "ch01_tokenization.json").read_text(encoding="utf-8"))

import tinyqwen  # noqa: E402
from tinyqwen import tokenizer as tq  # noqa: E402

# %% [markdown]
# `REFERENCE` holds the official answers: inputs and the ids, pieces and texts that the official Hugging Face
# `tokenizers` library and `transformers` produced for them. They were made by
# `exercises/references/make_ch01_tokenization.py`. We never compare only against tinyqwen, which is our own code.
#
# ## Why tokens?
#
# There are three obvious ways to turn text into integers:
#
# - **characters**: a small vocabulary, but long sequences. Attention costs grow with the square of the length.
# - **words**: short sequences, but the vocabulary never ends (names, typos, code, 100+ languages), and an unknown
#   word has no id at all.
# - **subwords made of bytes**: start from the 256 byte values, so *every* string can be written. Then learn
#   frequent byte sequences as extra tokens. This is byte-level *byte-pair encoding* (BPE), GPT-2's design, which
#   Qwen uses with 151,643 learned tokens.
#
# How much does that compress? Let's count bytes, characters and Qwen3 tokens for a few kinds of text. We use
# tinyqwen's tokenizer here as a black box; by the end of the chapter you will have written your own.

# %%
tiny_tok = tinyqwen.Tokenizer.qwen3()  # tinyqwen's tokenizer, on the bundled official files
samples = {
    "English": "The quick brown fox jumps over the lazy dog because it wants to see the world.",
    "German": "Der schnelle braune Fuchs springt über den faulen Hund, weil er die Welt sehen will.",
    "Chinese": "敏捷的棕色狐狸跳过了懒狗，因为它想看看这个世界。",
    "Python": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Numbers": "3.14159 2.71828 1.41421 1.73205 2025-04-29",
    "Emoji": "😀😃😄😁😆😅😂🤣🥲😊",
}
counts = {k: (len(t.encode()), len(t), len(tiny_tok.encode(t))) for k, t in samples.items()}
counts

# %%
x = np.arange(len(counts))
fig, ax = plt.subplots(figsize=(9, 3.5))
for j, label in enumerate(["UTF-8 bytes", "characters", "Qwen3 tokens"]):
    ax.bar(x + (j - 1) * 0.27, [c[j] for c in counts.values()], width=0.27, label=label)
ax.set_xticks(x, list(counts))
ax.set_ylabel("length of the sequence")
ax.set_title("The same texts as bytes, characters and Qwen3 tokens")
ax.legend()
plt.show()

# %% [markdown]
# English shrinks about 4.5 times from bytes to tokens, because common words are one token each. Code shrinks
# about 2.5 times. Chinese characters take three bytes each, and common ones (or pairs of them) are single tokens. Digits are never merged
# (you will see why below), so numbers cost one token per digit. Emoji are 4 bytes each, and rare ones take two
# tokens. That last fact will matter when we decode tokens one at a time.
#
# ## The pipeline
#
# Encoding is a pipeline of small steps. Each step must copy the official tokenizer exactly, quirks included:
#
# ```
#  "Hi <think>ça"
#   │ 1. added tokens, found in the raw text    ["Hi ", <think>, "ça"]
#   │ 2. NFC on the other parts                 "ça" (a decomposed "c" + U+0327 would become "ç")
#   │ 3. the split regex                        ["Hi", " "]  ["ça"]
#   │ 4. UTF-8 bytes as printable stand-ins     "ça" -> C3 A7 61 -> "Ã§a"
#   │ 5. BPE: merge adjacent symbols by rank    ["Ã","§","a"] -> ["Ã§","a"] -> ["Ã§a"]
#   ▼ 6. look the symbols up in vocab.json      [13048, 220, 151667, 17472]
# ```
#
# We build it bottom-up: bytes first, added tokens last. tinyqwen keeps each step in its own module of the
# `tinyqwen/tokenizer/` package, so you can read its version beside ours: `byte_level.py` (step 4),
# `pretokenize.py` (steps 2 and 3), `bpe.py` (step 5), `streaming.py` (decoding token by token), `files.py`
# (reading the tokenizer files) and `wrapper.py` (the `Tokenizer` class: steps 1 and 6, and the rest).
#
# ## Bytes as printable characters
#
# UTF-8 writes each Unicode character as 1 to 4 bytes. ASCII takes one byte, accented Latin letters two, most
# CJK characters three, and emoji four:

# %%
for ch in ["A", "ç", "中", "😁"]:
    print(f"{ch!r:6} U+{ord(ch):05X} -> {ch.encode('utf-8').hex(' ').upper()}")

# %% [markdown]
# BPE works on strings, and `vocab.json` and `merges.txt` are text files. So GPT-2 gave each of the 256 byte values
# a printable stand-in character. The 188 bytes that are already visible Latin-1 characters (`!`…`~`, `¡`…`¬`,
# `®`…`ÿ`) stand for themselves. The other 68 (control bytes, the space, `0x7F`–`0xA0`, the soft hyphen `0xAD`)
# move to `chr(256)`, `chr(257)`, … in byte order. That is why a space appears as `Ġ` (`chr(256 + 32)`) and a newline
# as `Ċ` in every Qwen vocabulary file.
#
# $$\text{stand-in}(b) = \begin{cases} \mathrm{chr}(b) & b \text{ printable Latin-1} \\
#   \mathrm{chr}(256 + k) & b \text{ is the } k\text{-th non-printable byte } (k = 0, 1, \dots, 67) \end{cases}$$

# %%
def bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    k = 0
    for b in range(256):  # the others, in byte order, get chr(256), chr(257), ...
        if b not in table:
            table[b] = chr(256 + k)
            k += 1
    return dict(sorted(table.items()))


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {ch: b for b, ch in BYTE_TO_CHAR.items()}
BYTE_TO_CHAR[ord(" ")], BYTE_TO_CHAR[ord("\n")], len(set(BYTE_TO_CHAR.values()))

# %% [markdown]
# Here is the whole table as a 16 × 16 grid, with the row as the high hex digit and the column as the low one. Blue
# cells stand for themselves; orange cells are the shifted ones.

# %%
from matplotlib.colors import ListedColormap  # noqa: E402

fig, ax = plt.subplots(figsize=(8.5, 8.5))
shifted = np.array([[BYTE_TO_CHAR[16 * r + c] != chr(16 * r + c) for c in range(16)] for r in range(16)])
ax.imshow(shifted, cmap=ListedColormap(["#cfe3f7", "#fdc89b"]))
for b, ch in BYTE_TO_CHAR.items():
    ax.text(b % 16, b // 16, ch, ha="center", va="center", fontsize=11)
ax.set_xticks(range(16), [f"{c:X}" for c in range(16)])
ax.set_yticks(range(16), [f"{r:X}_" for r in range(16)])
ax.set_title("bytes_to_unicode: byte 0xRC -> stand-in (orange = shifted to U+0100 and up)")
plt.show()

# %% [markdown]
# Our table must equal the official one. The reference file holds the official stand-ins, read off the
# `ByteLevel` step of the official `tokenizers` library, for the 243 byte values that occur in valid UTF-8. The other
# 13 (`C0`, `C1`, `F5`–`FF`) can never appear in text. It also holds the official alphabet: the set of all 256 stand-ins.

# %%
official_table = {int(b): ch for b, ch in REFERENCE["byte_table"].items()}
assert all(BYTE_TO_CHAR[b] == ch for b, ch in official_table.items())
assert sorted(BYTE_TO_CHAR.values()) == REFERENCE["alphabet"]
assert BYTE_TO_CHAR == tq.bytes_to_unicode()  # and tinyqwen's
print(f"{len(official_table)} bytes equal the official ByteLevel table; the 256 stand-ins equal its alphabet")

# %% [markdown]
# Turning text into symbols is now one line. We encode to UTF-8 and map every **byte**, not every character: `ç`
# becomes two symbols.

# %%
def to_symbols(text: str) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


for case in REFERENCE["symbols"]:
    assert to_symbols(case["text"]) == case["symbols"], case
to_symbols(" ça"), to_symbols("中"), to_symbols("tab\there")

# %% [markdown]
# ## The pre-tokenizer regex
#
# BPE never runs on a whole text. A regular expression first cuts the text into pieces, and each piece is encoded
# on its own. So a token can never span two words, or a word and the punctuation after it. Here is Qwen2/Qwen3's
# pattern, verbatim from the official `tokenizer.json`:

# %%
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
assert SPLIT_PATTERN == REFERENCE["split_regex"]

# %% [markdown]
# `regex.findall` tries the alternatives from left to right at each position. Read them in order:
#
# | alternative | matches | example |
# |---|---|---|
# | `(?i:'s\|'t\|'re\|'ve\|'m\|'ll\|'d)` | an English contraction, in any letter case | `'ll` in `you'll` |
# | `[^\r\n\p{L}\p{N}]?\p{L}+` | letters, with at most one leading non-letter (a space, a quote, a bracket) | ` world`, `(word` |
# | `\p{N}` | **one** digit | `2`, `0`, `2`, `5` |
# | ` ?[^\s\p{L}\p{N}]+[\r\n]*` | a run of punctuation with an optional leading space, and the newlines after it | `!\n`, ` {` |
# | `\s*[\r\n]+` | newlines with the whitespace before them | `\n\n` |
# | `\s+(?!\S)` | whitespace, except the last space before a non-space | the indentation of code |
# | `\s+` | any other whitespace | a trailing space |
#
# Every character is matched by some alternative, so joining the pieces gives back the text.

# %%
def pretokenize(text: str) -> list[str]:
    return regex.findall(SPLIT_PATTERN, text)


pretokenize("Hello,  world 2025!\n")

# %% [markdown]
# Look at the double space: the first space becomes its own piece, and the second one sticks to `world`. That is
# `\s+(?!\S)` at work: a run of spaces gives its *last* space to the word after it, so ` world` is the same token
# wherever it appears. Let's draw the pieces of a longer example, with `·` for a space and `↵` for a newline. (We
# reuse `draw_rows` for the BPE steps below.)

# %%
def draw_rows(rows: list[list[str]], title: str, notes: list[str] | None = None) -> None:
    """Draw each row of strings as a line of boxes (whitespace made visible), with an optional note per row."""
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 0.6))
    for r, row in enumerate(rows):
        x = 0.0
        for k, part in enumerate(row):
            label = part.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
            ax.text(x, -r, label, family="monospace", va="center",
                    bbox=dict(boxstyle="round,pad=0.2", fc=["#cfe3f7", "#fde0c5"][k % 2], ec="gray"))  # fmt: skip
            x += 0.7 * len(label) + 1.0
        if notes:
            ax.text(30, -r, notes[r], fontsize=9, va="center", color="dimgray")
    ax.set_xlim(-0.5, 58)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(title, loc="left")
    plt.show()


# %%
code = "    if x == 42:\n        print(\"it's 3.14!\")  # done\n"
pieces = pretokenize(code)
draw_rows([pieces[:14], pieces[14:]], "the pieces of a code snippet")

# %% [markdown]
# Three choices in this regex are easy to get wrong when you write it from memory:
#
# - **Digits go one at a time** (`\p{N}`). GPT-4's regex takes up to three (`\p{N}{1,3}`), so `2025` becomes `202`
#   `5`. With single digits, every number is written the same way, digit by digit, which helps arithmetic.
# - **Contractions come first and ignore letter case.** So `'D` and `'S` split off even where no contraction is
#   meant: `O'Donnell` becomes `O` `'D` `onnell`.
# - **Only one non-letter may lead a word.** So ` (word` becomes ` (` `word`, but `(word` stays whole.

# %%
gpt4_style = SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
print("Qwen :", pretokenize("In 2025, 12345 visits."))
print("GPT-4:", regex.findall(gpt4_style, "In 2025, 12345 visits."))
print("Qwen :", pretokenize("O'Donnell met O'Sullivan"))

# %% [markdown]
# The reference file holds the official pieces for ten tricky texts. They come from the official `Split`
# pre-tokenizer. Ours must match all of them, and so must tinyqwen's:

# %%
for case in REFERENCE["pretokenize"]:
    assert pretokenize(case["text"]) == case["pieces"] == tq.pre_tokenize(case["text"]), case["text"]
print(f"{len(REFERENCE['pretokenize'])} texts split exactly like the official pre-tokenizer")

# %% [markdown]
# ## BPE: merges in rank order
#
# `merges.txt` is the output of BPE *training*. The trainer started from the 256 byte symbols. It counted every
# adjacent pair in a huge corpus, merged the most frequent pair into a new symbol, wrote that pair down as the next
# line, and repeated. Line 1 (after the `#version` header) is the first merge learned, line 2 the second, and so
# on. A pair's **rank** is its line number, counting from 0.

# %%
def read_merges(path: Path) -> dict[tuple[str, str], int]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")  # a header, not a merge: ranks start on the next line
    pairs = [tuple(line.split(" ")) for line in lines[1:] if line]
    return {pair: rank for rank, pair in enumerate(pairs)}


RANKS = read_merges(DATA / "merges.txt")
VOCAB = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
len(RANKS), len(VOCAB), list(RANKS)[:8]

# %% [markdown]
# The first merges join spaces for code indentation (`Ġ Ġ`), `i n`, and `Ġ t`, the start of ` the`. Every merge
# creates a token of `vocab.json`. What do the merges build, rank by rank? Let's sort each merged token into four
# kinds: pure ASCII, Chinese/Japanese/Korean, other non-ASCII text, and "part of a character" (a token that ends
# inside a multi-byte character, such as the first bytes of an emoji).

# %%
def kind(pair: tuple[str, str]) -> int:
    text = bytes(CHAR_TO_BYTE[c] for c in pair[0] + pair[1]).decode("utf-8", errors="replace")
    if text.isascii():
        return 0
    if "\ufffd" in text:
        return 3
    cjk = any(0x3040 <= ord(c) <= 0x30FF or 0x4E00 <= ord(c) <= 0x9FFF or 0xAC00 <= ord(c) <= 0xD7AF for c in text)
    return 1 if cjk else 2


kinds = np.array([kind(pair) for pair in RANKS])  # [151387], in rank order
blocks = np.array([np.bincount(kinds[s : s + 5000], minlength=4) for s in range(0, len(kinds), 5000)])
fig, ax = plt.subplots(figsize=(9, 3))
bottom = np.zeros(len(blocks))
labels = ["ASCII (English, code)", "Chinese / Japanese / Korean", "other scripts", "part of a character"]
for k, label in enumerate(labels):
    ax.bar(np.arange(len(blocks)) * 5000, blocks[:, k], width=5000, bottom=bottom, align="edge", label=label)
    bottom += blocks[:, k]
ax.set_xlabel("rank (line of merges.txt)")
ax.set_ylabel("merges per block of 5,000")
ax.set_title("What the merges build, in rank order")
ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
plt.show()

# %% [markdown]
# The first ~95,000 merges build almost only ASCII tokens (English words, code). The next ~25,000 are Chinese,
# Japanese and Korean. The last ~30,000 are mostly other scripts: Cyrillic, Arabic, Hebrew, Thai, accented Latin.
# A token is only as likely to exist as its text was frequent in the training data.
#
# **Encoding** replays training on one piece. Start from its byte symbols, and at each step merge the adjacent pair
# whose rank is **lowest**, meaning the merge learned earliest. If that pair occurs twice, take the leftmost. Stop
# when no adjacent pair appears in `merges.txt`. It is not "merge from left to right", and it is not "merge the most
# frequent pair in this word". Both of those give different tokens. Here is the loop version, short and quadratic:

# %%
def bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(symbols)
    while len(parts) > 1:
        pair_ranks = [ranks.get(pair, float("inf")) for pair in zip(parts, parts[1:], strict=False)]
        best = min(pair_ranks)
        if best == float("inf"):
            break  # no adjacent pair is a merge: done
        i = pair_ranks.index(best)  # leftmost occurrence of the lowest rank
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


bpe(to_symbols(" tokenization"), RANKS)

# %% [markdown]
# tinyqwen's `Tokenizer.bpe_steps` records each merge (its loop, `merge_steps`, sits beside `merge_symbols` in
# `tinyqwen/tokenizer/bpe.py`). Let's watch ` tokenization` become `Ġtoken` + `ization`:

# %%
steps = tiny_tok.bpe_steps(" tokenization")
for step in steps:
    print(step)

# %%
rows = [list(to_symbols(" tokenization"))] + [list(step.symbols) for step in steps]
notes = ["the bytes"] + [f"rank {step.rank}: {step.pair[0]} + {step.pair[1]}" for step in steps]
draw_rows(rows, "BPE on ' tokenization': one merge per row, lowest rank first", notes)

# %% [markdown]
# The order really matters. A toy merge table makes it visible. In `abcd`, the pair `b c` has the lowest rank, so
# it merges first. After that, neither `a bc` nor `bc d` is a merge, and BPE stops at `a | bc | d`. Merging left to
# right would have made `ab`, then `cd`, then `abcd`, which is a different answer.

# %%
toy = {("b", "c"): 0, ("a", "b"): 1, ("c", "d"): 2, ("ab", "cd"): 3}
bpe("abcd", toy)

# %% [markdown]
# Now the real merges against the official tokens of twenty words, from ` hello` to
# ` Pneumonoultramicroscopicsilicovolcanoconiosis` and `你好世界`:

# %%
for case in REFERENCE["bpe"]:
    assert bpe(case["symbols"], RANKS) == case["tokens"], case["word"]
print(f"{len(REFERENCE['bpe'])} pieces give the official tokens, e.g.", REFERENCE["bpe"][-1]["tokens"])

# %% [markdown]
# *The fast version.* The loop rescans every pair after each merge. A piece of $n$ symbols costs $O(n^2)$, which is
# fine for words but slow for a run of 10,000 spaces. tinyqwen switches to a heap of (rank, position) for long
# pieces, as the official Rust code does. It also caches `piece -> ids`, because real text repeats the same pieces
# all the time. That cache is the one speed-up you need for the exercises.
#
# ## From text to ids
#
# Put the steps together. Each piece's final symbols are tokens of `vocab.json`, written in stand-ins
# (`"Ġhello": 23811`):

# %%
_piece_cache: dict[str, list[int]] = {}


def encode_ordinary(text: str) -> list[int]:
    """Ids of text that holds no added tokens: NFC, split, bytes, BPE, look up."""
    ids = []
    for piece in pretokenize(unicodedata.normalize("NFC", text)):
        if piece not in _piece_cache:
            _piece_cache[piece] = [VOCAB[s] for s in bpe(to_symbols(piece), RANKS)]
        ids += _piece_cache[piece]
    return ids


encode_ordinary("Hello world"), encode_ordinary("中文分词测试")

# %%
for case in REFERENCE["encode"]:
    assert encode_ordinary(case["text"]) == case["ids"], case["text"]
print(f"{len(REFERENCE['encode'])} texts (8 scripts, code, digits, emoji, whitespace runs) give the official ids")

# %% [markdown]
# ## NFC
#
# Unicode often has two ways to write the same visible text. `é` is one code point (U+00E9), or it is `e` followed
# by a combining acute accent (U+0301). Text copied from a PDF or a macOS file name is often in the second,
# *decomposed* form. The official tokenizer first applies **NFC** normalisation, which composes such sequences. So
# both spellings give the same ids. Without it, the model would see a different, rarer sequence of tokens:

# %%
composed, decomposed = "café", "cafe\u0301"
print(composed == decomposed, len(composed), len(decomposed))
print("with NFC   :", encode_ordinary(composed), encode_ordinary(decomposed))
print("without NFC:", [VOCAB[s] for p in pretokenize(decomposed) for s in bpe(to_symbols(p), RANKS)])

# %%
for case in REFERENCE["nfc"]:
    assert encode_ordinary(case["text"]) == case["ids"] != case["ids_without_nfc"], ascii(case["text"])
print(f"{len(REFERENCE['nfc'])} decomposed texts (accents, Hangul jamo, the Ångström sign) give the official ids")

# %% [markdown]
# (One honest caveat: Python's `unicodedata` follows a newer Unicode version than the official Rust library. For a
# handful of rare characters from recent scripts, the two NFCs differ. tinyqwen's `nfc` copies the official
# behaviour there; see `tinyqwen/tokenizer/pretokenize.py`. Ordinary text never meets them.)
#
# ## Added and special tokens
#
# Besides the 151,643 learned tokens, Qwen3 has 26 **added tokens** with ids 151643–151668. They are the
# punctuation of a conversation: `<|im_start|>`, `<|im_end|>`, `<think>`, `<tool_call>`, …. They are listed in
# `tokenizer_config.json`:

# %%
config = json.loads((DATA / "tokenizer_config.json").read_text(encoding="utf-8"))
ADDED = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
special = {c for i, c in REFERENCE["added_tokens"].items() if config["added_tokens_decoder"][i]["special"]}
print(len(ADDED), "added tokens;", len(special), "of them special")
print("not special:", [c for c in ADDED if c not in special])

# %% [markdown]
# The *special* ones are dropped by `decode(..., skip_special_tokens=True)`. `<think>`, `</think>` and the tool-call
# tags are added tokens but **not** special, so they survive that and can be parsed ([chapter 9](09-chat-template-thinking.ipynb)).
#
# An added token is matched in the **raw** text, before NFC and before the regex. If it is not, the regex cuts
# `<|im_start|>` into `<`, `|`, `im`, `_start`, `|`, `>`, which is six tokens that mean nothing to the model. Where
# two added tokens could match at the same place, the longer one wins.

# %%
ADDED_RE = regex.compile("|".join(regex.escape(t) for t in sorted(ADDED, key=len, reverse=True)))


def encode(text: str) -> list[int]:
    ids, start = [], 0
    for m in ADDED_RE.finditer(text):
        ids += encode_ordinary(text[start : m.start()]) + [ADDED[m.group()]]
        start = m.end()
    return ids + encode_ordinary(text[start:])


print(encode("<|im_start|>user\nHi!<|im_end|>"))
print(encode_ordinary("<|im_start|>user\nHi!<|im_end|>"), "<- if added tokens went through the regex")

# %%
for case in REFERENCE["added"]:
    assert encode(case["text"]) == case["ids"] != case["ids_as_plain_text"], case["text"]
print(f"{len(REFERENCE['added'])} texts with added tokens give the official ids")

# %% [markdown]
# This is exactly how the chat template reaches the model. `apply_chat_template` writes a conversation as text with
# these markers ([chapter 9](09-chat-template-thinking.ipynb)), and the tokenizer turns each marker into its single
# id. (It also means that a user who *types* `<|im_end|>` into a message produces the real marker. The official
# tokenizer does the same, so we copy it, but a chat application should think about it.)

# %%
chat = tinyqwen.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
print(repr(chat))
encode(chat)

# %% [markdown]
# ## Decoding
#
# Decoding runs the pipeline backwards. Each id becomes its token string, each stand-in becomes its byte again,
# and all the bytes are joined and decoded as UTF-8 **once**. Joining first matters, because a character can be
# split over two tokens. Bytes that are not valid UTF-8 become `�` (U+FFFD), as in the official decoder.

# %%
ID_TO_TOKEN = {i: t for t, i in VOCAB.items()} | {i: t for t, i in ADDED.items()}


def token_bytes(i: int) -> bytes:
    token = ID_TO_TOKEN[i]
    if all(ch in CHAR_TO_BYTE for ch in token):
        return bytes(CHAR_TO_BYTE[ch] for ch in token)
    return token.encode("utf-8")  # (no Qwen3 token needs this; added tokens are ASCII)


def decode(ids: list[int]) -> str:
    return b"".join(token_bytes(i) for i in ids).decode("utf-8", errors="replace")


print(decode(encode("Größe 中文 😁 <think>")))
print(repr(decode([26525])), "<- 3 of the 4 bytes of an emoji, alone")

# %%
for case in REFERENCE["decode"]:
    assert decode(case["ids"]) == case["text"], case["ids"]
print(f"{len(REFERENCE['decode'])} id sequences decode to the official text")

# %% [markdown]
# ## Streaming decode
#
# A chat program shows the answer while it is being generated, one token at a time. The easy way, `decode([id])` for
# each new id, prints garbage whenever a character is split over two tokens. Here is `"hi 😁"`:

# %%
ids = encode("hi 😁")
print(ids, [decode([i]) for i in ids])
print([token_bytes(i).hex(" ") for i in ids])

# %% [markdown]
# The emoji's four bytes `F0 9F 98 81` are split 3 + 1: the token ` ðŁĺ` (id 26525) carries a space and the first
# three bytes, and id 223 carries the last one. The picture shows token boundaries against character boundaries:

# %%
raw = [token_bytes(i) for i in ids]
fig, ax = plt.subplots(figsize=(8, 1.8))
pos = 0
for t, chunk in enumerate(raw):
    ax.add_patch(plt.Rectangle((pos, 0.55), len(chunk), 0.4, fc=["#cfe3f7", "#fde0c5"][t % 2], ec="gray"))
    ax.text(pos + len(chunk) / 2, 0.75, f"id {ids[t]}", ha="center", va="center", fontsize=9)
    for k, b in enumerate(chunk):
        ax.text(pos + k + 0.5, 0.3, f"{b:02X}", ha="center", va="center", family="monospace")
    pos += len(chunk)
for start, n, label in [(0, 1, "h"), (1, 1, "i"), (2, 1, "space"), (3, 4, "😁 (4 bytes)")]:
    ax.add_patch(plt.Rectangle((start, 0.0), n, 0.15, fc="#d9f2d9", ec="gray"))
    ax.text(start + n / 2, -0.12, label, ha="center", va="top", fontsize=9)
ax.set_xlim(-0.2, pos + 0.2)
ax.set_ylim(-0.45, 1.0)
ax.axis("off")
ax.set_title("tokens (top) and characters (bottom) do not line up", loc="left")
plt.show()

# %% [markdown]
# So we keep a byte buffer and hold back any incomplete character at its end. UTF-8 makes that easy to detect, because
# the first byte of a character says how many bytes it has: `0xxxxxxx` one, `110xxxxx` two, `1110xxxx` three,
# `11110xxx` four. Every following byte looks like `10xxxxxx`. Look back at most three bytes for the start of the last
# character. If it needs more bytes than the buffer holds, hold them back.

# %%
def incomplete_tail(buf: bytes) -> int:
    """How many bytes at the end of buf start a character whose other bytes have not arrived yet."""
    for k in range(1, min(3, len(buf)) + 1):
        b = buf[-k]
        if b < 0x80:
            return 0  # ASCII: complete
        if b >= 0xC0:  # the first byte of a multi-byte character
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return k if k < need else 0
    return 0  # only continuation bytes: invalid anyway, nothing to wait for


def stream_decode(ids: list[int]) -> list[str]:
    pending, out = b"", []
    for i in ids:
        pending += token_bytes(i)
        ready = len(pending) - incomplete_tail(pending)
        out.append(pending[:ready].decode("utf-8", errors="replace"))
        pending = pending[ready:]
    return out + [pending.decode("utf-8", errors="replace")]  # the flush at the end


stream_decode(ids)

# %% [markdown]
# Our `incomplete_tail` has a blind spot. A few byte pairs can *never* become valid, such as `E0 80` (an "overlong"
# form). Our version would hold those back until the flush, while the official full decode shows `�` for them at
# once. tinyqwen's `incomplete_utf8_tail` (in `tinyqwen/tokenizer/streaming.py`) checks the second byte's allowed
# range too. Python's incremental UTF-8 decoder follows the same rules, and the reference chunks were made with it.

# %%
decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
stdlib_chunks = [decoder.decode(token_bytes(i)) for i in ids] + [decoder.decode(b"", final=True)]
stream = tiny_tok.stream_decoder()
assert stream_decode(ids) == stdlib_chunks == [stream.push(i) for i in ids] + [stream.flush()]
for case in REFERENCE["stream"]:
    assert stream_decode(case["ids"]) == case["chunks"], case["ids"]
    assert "".join(case["chunks"]) == decode(case["ids"])
print(f"{len(REFERENCE['stream'])} streams split exactly as UTF-8 allows, and join to the official text")

# %% [markdown]
# ## Checkpoint: the official ids
#
# If an official Qwen3 checkpoint is on this machine (`$TINYQWEN_MODEL` or the Hugging Face cache), its tokenizer
# files should be the very files we used. Otherwise we say so and carry on with the bundled copies:

# %%
from tinyqwen.hub import official_checkpoint  # noqa: E402

checkpoint = official_checkpoint()
if checkpoint is None or not (checkpoint / "vocab.json").is_file():
    print("no official checkpoint found: using the official tokenizer files bundled in tinyqwen/data")
else:
    same = all((checkpoint / n).read_bytes() == (DATA / n).read_bytes() for n in ("vocab.json", "merges.txt"))
    print(f"{checkpoint}: vocab.json and merges.txt are {'identical to' if same else 'DIFFERENT from'} the bundled files")

# %% [markdown]
# Last, everything at once: our `encode` and `decode` (and tinyqwen's) against
#
# - every official reference of this chapter, including a real chat prompt that `transformers` rendered with the
#   official chat template, and
# - llama.cpp's 46 tokenizer test strings for Qwen2 (`tests/data/ggml-vocab-qwen2.gguf.*`). These are an
#   **independent** set of expected ids, made upstream with Hugging Face's `AutoTokenizer`.

# %%
cases = [(c["text"], c["ids"]) for key in ("encode", "nfc", "added") for c in REFERENCE[key]]
cases.append((REFERENCE["real_pipeline"]["text"], REFERENCE["real_pipeline"]["ids"]))
inp = (REPO / "tests" / "data" / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
out = (REPO / "tests" / "data" / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8")
llama = list(zip(inp.split("\n__ggml_vocab_test__\n")[:-1], out.split("\n"), strict=False))
cases += [(text, [int(i) for i in ids.split()]) for text, ids in llama]
bad = [text for text, want in cases
       if not encode(text) == want == tiny_tok.encode(text) or decode(want) != unicodedata.normalize("NFC", text)]
assert not bad, bad
print(f"{len(cases)} texts ({len(llama)} of them llama.cpp's) encode to the official ids (ours and tinyqwen's), "
      f"{sum(len(w) for _, w in cases):,} ids in all, and decode back to their (NFC) text")  # fmt: skip

# %% [markdown]
# ## Extension: train your own BPE
#
# Where does `merges.txt` come from? From the training loop described in "BPE: merges in rank order", run on a
# huge corpus. We can run it on a small one. The rules, all of them choices a trainer must make explicit:
#
# 1. **Pieces first.** The text is NFC-normalised and split with the same regex as above, and each distinct piece
#    is counted: a merge can never cross a piece boundary, so the encoder and the trainer agree. Special tokens
#    such as `<|endoftext|>` are cut out of the text before that, so no merge spans one.
# 2. **Count, merge, repeat.** Count every adjacent pair of symbols over all pieces (a piece seen 5 times counts
#    5 times), merge the most frequent pair everywhere (left to right: `a a a` becomes `aa a`), write it down as
#    the next line of `merges.txt`.
# 3. **Ties.** Two pairs often have the same count. Any fixed rule works, but it must be fixed, or two runs give
#    different tokenizers. Ours: the pair that sorts first as a tuple of symbol strings, `min((a, b), ...)`.
#    (GPT-2-style trainers such as CS336's take the lexicographically *greatest* pair of byte strings instead;
#    neither is more correct.)
#
# The plain loop recounts every pair of every piece after each merge. Most of that work is wasted: a merge of
# `(a, b)` changes only the pieces that contain `a b`, and in each of them only the pairs next to each
# occurrence: `(left, a)` becomes `(left, ab)`, `(b, right)` becomes `(ab, right)`, `(a, b)` disappears. The
# **incremental** trainer keeps the pair counts and a map pair → pieces that hold it, updates only those, and finds
# the most frequent pair with a heap of `(-count, pair)`: when a count changes it pushes a new entry, and an entry
# popped with an out-of-date count is skipped. `tinyqwen.corpus.train_bpe` does this; so does the chapter's
# solution. Same merges, far less work:

# %%
import time  # noqa: E402
from collections import Counter  # noqa: E402

from tinyqwen import corpus  # noqa: E402

english = (REPO / "benchmarks" / "data" / "english-like.txt").read_text(encoding="utf-8")  # 130 kB, generated


def train_naive(text: str, n_merges: int) -> list[tuple[str, str]]:
    words = {tuple(w): c for w, c in corpus.word_counts([text], ("<|endoftext|>",)).items()}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p in pairs if pairs[p] == top)  # the tie-break rule
        merges.append(best)
        merged = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


part = english[:20_000]
t0 = time.perf_counter()
naive = train_naive(part, 100)
t1 = time.perf_counter()
_, fast = corpus.train_bpe([part], 256 + 100, ("<|endoftext|>",))
t2 = time.perf_counter()
assert fast == naive
print(f"20 kB, 100 merges: naive {t1 - t0:.2f} s, incremental {t2 - t1:.3f} s, the same merges")
t0 = time.perf_counter()
_, merges = corpus.train_bpe([english], 499, ("<|endoftext|>",))  # vocab 500: 256 bytes + 243 merges + 1 special
print(f"130 kB, {len(merges)} merges: incremental {time.perf_counter() - t0:.2f} s")
print("first merges:", [a + b for a, b in merges[:12]])
print("last merges: ", [a + b for a, b in merges[-8:]])

# %% [markdown]
# The first merges are the frequent letter pairs and a space with the letter after it (`Ġs`, `th`); the later ones
# are whole frequent words. `benchmarks/bench_bpe_training.py` times the full task (130 kB, vocabulary 500, one
# special token): the naive loop needs seconds, the incremental one a fraction of one. The same trainer makes the
# tokenizer of chapter 13's tiny model. Writing it yourself is the extension exercise `train_bpe`.

# %% [markdown]
# ## Summary
#
# - Qwen3's tokenizer is GPT-2-style **byte-level BPE**. Text becomes UTF-8 bytes, and each byte has a printable
#   stand-in (`Ġ` is a space), so any string can be encoded and no id is ever "unknown".
# - A **regex** cuts the text into pieces first: single digits, a leading space glued to words, contractions in any
#   letter case. BPE runs on each piece alone.
# - **BPE encoding** merges the adjacent pair with the **lowest rank** (the earliest line of `merges.txt`), one merge
#   at a time, until no pair is a merge.
# - **NFC** makes equal-looking text give equal ids. **Added tokens** are matched in the raw text first, longest
#   first. `<think>` is added but not special.
# - **Decoding** joins all bytes before decoding UTF-8. **Streaming** holds back the bytes of an unfinished
#   character until the token that completes it arrives.
#
# The [next chapter](02-loading-weights.ipynb) opens the checkpoint files and reads the model's weights byte by byte.
#
# ## Exercises
#
# Write the tokenizer yourself in `exercises/ch01_tokenization.py`: `bytes_to_unicode`, `to_symbols`,
# `pretokenize`, `bpe`, `encode_ordinary`, `encode`, `decode` and `stream_decode`, and as an extension `train_bpe`
# (section "Extension: train your own BPE"). Each stub's docstring has a worked example. Then run
#
# ```bash
# pytest exercises/test_ch01_tokenization.py
# ```
#
# The first ten checkpoints go from the byte table to "your tokenizer in the real pipeline". That last one encodes a real
# chat prompt with your code, runs the ids through a Qwen3 with the real 151,936-token vocabulary, and compares the
# logits with `transformers`. It then decodes the model's greedy continuation with your decoder. If a checkpoint
# fails, the message names the input, shows the first difference, and, for the classic mistakes (characters instead
# of bytes, GPT-4's digit groups, left-to-right merging, no NFC, added tokens after the regex), says which one it is.
# The eleventh grades your `train_bpe`: the same merges as a plain trainer, on small corpora full of ties.
#
# Part I's capstone, `exercises/ch18_capstone_files.py`, is the tokenizer again with no scaffolding: read `vocab.json`,
# `merges.txt` and `tokenizer_config.json` yourself; `pytest exercises/test_ch18_capstone_files.py` grades it against
# the official ids.
