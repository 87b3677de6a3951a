"""Chapter 1 checkpoints: your tokenizer, id for id against the official Qwen3 tokenizer.

Expected values come from exercises/references/ch01_tokenization.json (made by make_ch01_tokenization.py with the
official Hugging Face `tokenizers` library and transformers), except where a test says it derives them by hand.
The tokenizer files themselves (tinyqwen/data: the official vocab.json, merges.txt and tokenizer_config.json,
byte for byte) are parsed here with plain `json`, so nothing you are graded against comes from tinyqwen's
tokenizer.

Run: pytest exercises/test_ch01_tokenization.py        (add --solutions to grade tinyqwen's own tokenizer)
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import regex

from exercises import grading
from exercises.grading import (
    REFERENCES,
    REPO,
    GradeError,
    Mistake,
    expect,
    expect_close,
    expect_equal,
    notebook,
    reference_file,
)
from tinyqwen.verify import tolerance  # the project's one bound for logits: 1e-5 · max(1, max |logit|)

DATA = REPO / "tinyqwen" / "data"
REF = reference_file("ch01_tokenization.json")


# reread("Decoding") -> 'notebooks/01-tokenization.ipynb, section "Decoding"': where a failure sends the learner
reread = functools.partial(notebook, 1)


@functools.cache
def files() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, int], dict[int, str]]:
    """(vocab, ranks, added, id_to_token) read from the official files, once per session."""
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    lines = (DATA / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    ranks: dict[tuple[str, str], int] = {}
    for line in lines[1:]:
        if line:
            left, right = line.split(" ")
            ranks[left, right] = len(ranks)  # rank = position among the merges (the header line is not one)
    config = json.loads((DATA / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
    id_to_token = {i: token for token, i in vocab.items()} | {i: token for token, i in added.items()}
    return vocab, ranks, added, id_to_token


# every call of your functions: a crash becomes a failure message; a KeyError gets this chapter's usual cause
call = functools.partial(grading.call, hints={KeyError: (
    "a key missing from a table is usually a symbol that is not in the vocabulary: look tokens up by their byte "
    "stand-ins (to_symbols: a space is 'Ġ'), after BPE, and match added tokens like '<|im_end|>' before anything "
    "else."
)})  # fmt: skip


# ------------------------------------------------------------------------------------------ known-wrong variants
# Each is a plausible learner bug, written out so that the grader can recognise its output and name it.

# GPT-2's table done by hand (the printable ranges of Latin-1 stand for themselves, the rest shift to 256+).
PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]


def by_hand_table() -> dict[int, str]:
    table = {b: chr(b) for b in PRINTABLE}
    others = [b for b in range(256) if b not in table]
    return table | {b: chr(256 + k) for k, b in enumerate(others)}


def chars_not_bytes(text: str) -> str:
    """to_symbols applied to the characters of the text instead of its UTF-8 bytes."""
    table = by_hand_table()
    return "".join(table.get(ord(c), c) for c in text)


SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT4_DIGITS = SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")  # cl100k takes up to 3 digits at once
CASE_SENSITIVE = SPLIT_PATTERN.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "'s|'t|'re|'ve|'m|'ll|'d")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def split_with(pattern: str, text: str) -> list[str]:
    return regex.findall(pattern, text)


def lowest_rank_first(
    symbols: str, ranks
) -> list[str]:  # the right algorithm, written plainly (for the toy cases)
    parts = list(symbols)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), float("inf")))
        if (parts[best], parts[best + 1]) not in ranks:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def leftmost_first(symbols: str, ranks) -> list[str]:
    """Bug: merges the leftmost pair that has ANY merge, ignoring which merge has the lowest rank."""
    parts = list(symbols)
    while True:
        i = next((i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) in ranks), None)
        if i is None:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def most_frequent_first(symbols: str, ranks) -> list[str]:
    """Bug: merges the most frequent mergeable pair everywhere (that is how BPE is TRAINED, not how it encodes)."""
    parts = list(symbols)
    while True:
        counts = Counter(p for p in zip(parts, parts[1:], strict=False) if p in ranks)
        if not counts:
            return parts
        pair = counts.most_common(1)[0][0]
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged


def highest_rank_first(symbols: str, ranks) -> list[str]:
    """Bug: max instead of min over the ranks."""
    parts = list(symbols)
    while True:
        found = [(ranks[p], i) for i, p in enumerate(zip(parts, parts[1:], strict=False)) if p in ranks]
        if not found:
            return parts
        _, i = max(found, key=lambda x: (x[0], -x[1]))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def bpe_mistakes(symbols: str, ranks) -> list[Mistake]:
    return [
        Mistake(
            "merging the leftmost mergeable pair first",
            lambda: leftmost_first(symbols, ranks),
            "Position does not decide: at every step merge the adjacent pair with the LOWEST rank anywhere in "
            "the piece (the leftmost only breaks ties).",
        ),
        Mistake(
            "merging the most frequent pair first",
            lambda: most_frequent_first(symbols, ranks),
            "Counting pairs is how the merges were learned; to encode, apply them in rank order, lowest first.",
        ),
        Mistake(
            "taking the highest rank first",
            lambda: highest_rank_first(symbols, ranks),
            "A lower rank means an earlier line of merges.txt, i.e. a more frequent pair: use min, not max.",
        ),
    ]


# ------------------------------------------------------------------------------------------ checkpoints


def test_bytes_to_unicode(course):
    """The byte <-> unicode table"""
    what = "bytes_to_unicode()"
    table = call(
        course.ch01.bytes_to_unicode, what=what, inputs="()", reread=reread("Bytes as printable characters")
    )
    section = reread("Bytes as printable characters")
    identity = {b: chr(b) for b in range(256)}
    plus_256 = {b: chr(b) if b in PRINTABLE else chr(256 + b) for b in range(256)}
    mistakes = [
        Mistake("every byte mapped to chr(byte)", [identity[b] for b in range(256)],
                "Bytes that are not printable (space, newline, control bytes) must move to chr(256) and up, so "
                "that every symbol is visible and none is whitespace."),
        Mistake("the shifted bytes mapped to chr(256 + byte)", [plus_256[b] for b in range(256)],
                "The 68 shifted bytes get chr(256), chr(257), ... in turn: count them, do not add 256 to the byte."),
    ]  # fmt: skip
    expect(
        isinstance(table, dict),
        what=what,
        problem=f"expected a dict, got {type(table).__name__}",
        reread=section,
    )
    expect_equal(sorted(table), list(range(256)), what=what + ": its keys must be the byte values 0..255",
                 reread=section)  # fmt: skip
    got = [table[b] for b in range(256)]  # index = byte value
    official = {int(b): ch for b, ch in REF["byte_table"].items()}
    # 243 bytes against the official ByteLevel (the 13 that UTF-8 never produces are checked by hand just below)
    expect_equal(got, [official.get(b, got[b]) for b in range(256)], mistakes=mistakes, reread=section,
                 what=what + " vs the official ByteLevel table (list index = byte value)")  # fmt: skip
    expect_equal(got, [by_hand_table()[b] for b in range(256)], mistakes=mistakes, reread=section,
                 what=what + " vs GPT-2's rule, derived by hand (list index = byte value)")  # fmt: skip
    expect_equal(
        sorted(got), REF["alphabet"], what=what + ": its values vs the official alphabet", reread=section
    )


def test_to_symbols(course):
    """Text as byte symbols"""
    section = reread("Bytes as printable characters")
    for case in REF["symbols"]:
        text = case["text"]
        got = call(course.ch01.to_symbols, text, what="to_symbols", inputs=repr(text), reread=section)
        expect_equal(got, case["symbols"], what="to_symbols(text)", inputs=repr(text), reread=section,
                     mistakes=[
                         Mistake("the text was returned unchanged", text,
                                 "Encode it to UTF-8 bytes first, then map every byte through bytes_to_unicode()."),
                         Mistake("mapping characters, not bytes", chars_not_bytes(text),
                                 "Map the UTF-8 BYTES (text.encode('utf-8')), not the characters: 'ç' is two "
                                 "bytes, C3 A7, so two symbols, 'Ã§'."),
                     ])  # fmt: skip


def test_pretokenize(course):
    """The pre-tokenizer regex"""
    section = reread("The pre-tokenizer regex")
    assert SPLIT_PATTERN == REF["split_regex"] and SPLIT_PATTERN not in (GPT4_DIGITS, CASE_SENSITIVE)
    for case in REF["pretokenize"]:
        text = case["text"]
        got = call(course.ch01.pretokenize, text, what="pretokenize", inputs=repr(text), reread=section)
        expect_equal(got, case["pieces"], what="pretokenize(text)", inputs=repr(text), reread=section,
                     mistakes=[
                         Mistake("digits split in groups of up to 3 (the GPT-4 / cl100k regex)",
                                 split_with(GPT4_DIGITS, text),
                                 r"Qwen splits numbers into single digits: the alternative is \p{N}, not \p{N}{1,3}."),
                         Mistake("contractions matched case-sensitively", split_with(CASE_SENSITIVE, text),
                                 "Keep the (?i: ... ) group: contractions match in any case, so \"O'Donnell\" "
                                 "splits as O | 'D | onnell."),
                         Mistake("GPT-2's regex instead of Qwen's", split_with(GPT2_PATTERN, text),
                                 "Use SPLIT_PATTERN as given: Qwen's regex keeps single digits, lets one non-letter "
                                 "lead a word, and keeps newlines with the punctuation before them."),
                         Mistake("splitting on whitespace", text.split(),
                                 "Use regex.findall(SPLIT_PATTERN, text): no character may be dropped."),
                     ])  # fmt: skip


def test_bpe_by_hand(course):
    """BPE on a toy merge table (derived by hand)"""
    section = reread("BPE: merges in rank order")
    toy = {("l", "l"): 0, ("h", "e"): 1, ("he", "ll"): 2, ("hell", "o"): 3}
    # "abcd": b+c has the lowest rank, so it goes first; then neither a+bc nor bc+d is a merge -> a | bc | d.
    order = {("b", "c"): 0, ("a", "b"): 1, ("c", "d"): 2, ("ab", "cd"): 3}
    # "xyxya": y+a (rank 0) first, then x+y (rank 1) once at the front -> xy | x | ya.
    freq = {("y", "a"): 0, ("x", "y"): 1}
    # "aaaa": one merge at a time, leftmost of equal ranks: aa a a -> aa aa -> aaaa.
    repeat = {("a", "a"): 0, ("aa", "aa"): 1}
    cases = [("hello", toy, ["hello"]), ("hallo", toy, ["h", "a", "ll", "o"]), ("abcd", order, ["a", "bc", "d"]),
             ("xyxya", freq, ["xy", "x", "ya"]), ("aaaa", repeat, ["aaaa"]), ("x", toy, ["x"])]  # fmt: skip
    for symbols, ranks, want in cases:
        assert lowest_rank_first(symbols, ranks) == want  # the hand derivation above, checked
        inputs = f"bpe({symbols!r}, {ranks})"
        got = call(course.ch01.bpe, symbols, dict(ranks), what="bpe", inputs=inputs, reread=section)
        expect_equal(got, want, what="bpe on a toy merge table", inputs=inputs, reread=section,
                     mistakes=bpe_mistakes(symbols, ranks))  # fmt: skip


def test_bpe_real_merges(course):
    """BPE with the real merges.txt"""
    section = reread("BPE: merges in rank order")
    _, ranks, _, _ = files()
    for case in REF["bpe"]:
        inputs = f"bpe({case['symbols']!r}, ranks)   (the piece {case['word']!r})"
        got = call(course.ch01.bpe, case["symbols"], ranks, what="bpe", inputs=inputs, reread=section)
        expect_equal(got, case["tokens"], what="bpe with Qwen3's 151,387 merges", inputs=inputs,
                     reread=section, mistakes=bpe_mistakes(case["symbols"], ranks))  # fmt: skip


def test_encode_ordinary(course):
    """Ordinary text to ids (NFC, split, bytes, BPE, lookup)"""
    vocab, ranks, _, _ = files()
    section = reread("From text to ids")
    for case in REF["encode"]:
        got = call(course.ch01.encode_ordinary, case["text"], vocab, ranks, what="encode_ordinary",
                   inputs=repr(case["text"]), reread=section)  # fmt: skip
        expect_equal(got, case["ids"], what="encode_ordinary(text) vs the official tokenizer",
                     inputs=repr(case["text"]), reread=section)  # fmt: skip
    for case in REF["nfc"]:
        got = call(course.ch01.encode_ordinary, case["text"], vocab, ranks, what="encode_ordinary",
                   inputs=ascii(case["text"]), reread=reread("NFC"))  # fmt: skip
        expect_equal(got, case["ids"], what="encode_ordinary on text that NFC changes", inputs=ascii(case["text"]),
                     reread=reread("NFC"), mistakes=[
                         Mistake("NFC normalisation not applied", case["ids_without_nfc"],
                                 "Start with unicodedata.normalize('NFC', text): 'e' + U+0301 must become 'é' "
                                 "before splitting, as the official normalizer does."),
                     ])  # fmt: skip


def test_encode_added_tokens(course):
    """Added and special tokens"""
    vocab, ranks, added, _ = files()
    section = reread("Added and special tokens")
    expect_equal(added, {content: int(i) for i, content in REF["added_tokens"].items()},
                 what="the added tokens of tokenizer_config.json vs the official tokenizer.json")  # fmt: skip
    for case in REF["added"]:
        got = call(course.ch01.encode, case["text"], vocab, ranks, added, what="encode", inputs=repr(case["text"]),
                   reread=section)  # fmt: skip
        expect_equal(got, case["ids"], what="encode(text) with added tokens vs the official tokenizer",
                     inputs=repr(case["text"]), reread=section, mistakes=[
                         Mistake("added tokens went through the regex like ordinary text", case["ids_as_plain_text"],
                                 "Find the added tokens in the RAW text first (before NFC and the regex), emit "
                                 "their ids, and encode only the stretches between them."),
                     ])  # fmt: skip
    for case in REF["encode"][:6]:  # no added token in the text: encode must equal encode_ordinary
        got = call(course.ch01.encode, case["text"], vocab, ranks, added, what="encode", inputs=repr(case["text"]),
                   reread=section)  # fmt: skip
        expect_equal(got, case["ids"], what="encode(text) on text without added tokens", inputs=repr(case["text"]),
                     reread=section)  # fmt: skip


def test_decode(course):
    """Ids back to text"""
    _, _, _, id_to_token = files()
    section = reread("Decoding")
    table = by_hand_table()
    inverse = {ch: b for b, ch in table.items()}
    for case in REF["decode"]:
        ids = case["ids"]
        got = call(course.ch01.decode, ids, id_to_token, what="decode", inputs=f"ids {ids}", reread=section)
        raw = [bytes(inverse[c] for c in id_to_token[i]) for i in ids]
        expect_equal(got, case["text"], what="decode(ids) vs the official tokenizer", inputs=f"ids {ids}",
                     reread=section, mistakes=[
                         Mistake("the token strings were joined as text", "".join(id_to_token[i] for i in ids),
                                 "Token strings are byte stand-ins ('Ġ' is a space): map every character back to "
                                 "its byte with the inverse of bytes_to_unicode()."),
                         Mistake("each token was decoded to text on its own", "".join(
                                 r.decode("utf-8", errors="replace") for r in raw),
                                 "A character may be split over two tokens: join ALL the bytes first, then decode "
                                 "once."),
                         Mistake("invalid bytes dropped", b"".join(raw).decode("utf-8", errors="ignore"),
                                 "Use errors='replace': the official decoder shows invalid bytes as '�'."),
                     ])  # fmt: skip


def test_stream_decode(course):
    """Streaming decode of a split emoji"""
    _, _, _, id_to_token = files()
    section = reread("Streaming decode")
    inverse = {ch: b for b, ch in by_hand_table().items()}
    for case in REF["stream"]:
        ids = case["ids"]
        got = call(course.ch01.stream_decode, ids, id_to_token, what="stream_decode", inputs=f"ids {ids}",
                   reread=section)  # fmt: skip
        raw = [bytes(inverse[c] for c in id_to_token[i]) for i in ids]
        whole = b"".join(raw).decode("utf-8", errors="replace")
        expect_equal(got, case["chunks"], what="stream_decode(ids): the text complete after each id, then flush",
                     inputs=f"ids {ids}", reread=section, mistakes=[
                         Mistake("each token decoded on its own", [r.decode("utf-8", errors="replace") for r in raw]
                                 + [""], "Keep the bytes of an unfinished character back until the token that "
                                 "completes it arrives; show '�' only for bytes that can never become valid."),
                         Mistake("everything held back until the end", [""] * len(ids) + [whole],
                                 "Emit every complete character as soon as it is complete."),
                     ])  # fmt: skip


# ------------------------------------------------------------------------------------------ the real pipeline


def _generator_module():
    path = REFERENCES / "make_ch01_tokenization.py"
    spec = importlib.util.spec_from_file_location("make_ch01_tokenization", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # only NumPy at import time: torch & co are imported inside its main()
    return module


@functools.cache
def real_vocab_model():
    """The tiny Qwen3 with the real 151,936-row vocabulary, written as an official checkpoint and loaded."""
    from tinyqwen.model import load_model
    from tinyqwen.safetensors import save_file

    info = REF["real_pipeline"]
    recipe = _generator_module()
    tensors = recipe.real_vocab_tensors(info["config"], info["seed"])
    if recipe.tensors_sha256(tensors) != info["weights_sha256"]:
        raise GradeError(
            "the real-vocabulary checkpoint could not be rebuilt: the weights drawn with this NumPy differ from "
            "the ones transformers saw (sha256 mismatch). This is not your code; please report it."
        )
    folder = Path(tempfile.mkdtemp(prefix="tinyqwen-ch01-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "config.json").write_text(json.dumps(info["config"], indent=2), encoding="utf-8")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return load_model(folder)


def test_real_pipeline(course):
    """Your tokenizer in the real pipeline"""
    vocab, ranks, added, id_to_token = files()
    info = REF["real_pipeline"]
    section = reread("Checkpoint: the official ids")
    text = info["text"]
    # 1. your encode on a real chat prompt (rendered by the official chat template) gives the official ids
    ids = call(
        course.ch01.encode,
        text,
        vocab,
        ranks,
        added,
        what="encode",
        inputs="the chat prompt",
        reread=section,
    )
    expect_equal(ids, info["ids"], what="encode(chat prompt) vs the official tokenizer", inputs=repr(text),
                 reread=section, mistakes=[
                     Mistake("added tokens went through the regex like ordinary text", info["ids_as_plain_text"],
                             "'<|im_start|>' must become the single id 151644 before the regex sees the text."),
                 ])  # fmt: skip
    # 2. those ids run through a real-vocabulary Qwen3; its logits equal transformers' on the official ids
    model = real_vocab_model()
    arrays = reference_file("ch01_tokenization.npz")
    columns, want = arrays["logits_columns"], arrays["logits"]
    logits = model(np.asarray(ids, dtype=np.int64))[:, columns]  # [T, K]
    expect_close(logits, want, what="a real-vocabulary Qwen3 on your ids vs transformers' logits", atol=tolerance(want),
                 inputs=f"{len(ids)} ids, logits at {len(columns)} vocabulary columns")  # fmt: skip
    # 3. greedy generation continues as transformers' did, and your decoder turns those ids into the official text
    from tinyqwen.generation import generate

    new = generate(model, ids, max_new_tokens=info["max_new_tokens"], eos_token_ids=())
    expect_equal(new, info["new_ids"], what="greedy continuation of your ids vs transformers' generate")
    got = call(
        course.ch01.decode, new, id_to_token, what="decode", inputs=f"ids {new}", reread=reread("Decoding")
    )
    expect_equal(got, info["new_text"], what="decode(the generated ids) vs the official decode", inputs=f"ids {new}",
                 reread=reread("Decoding"))  # fmt: skip
    chunks = call(course.ch01.stream_decode, new, id_to_token, what="stream_decode", inputs=f"ids {new}",
                  reread=reread("Streaming decode"))  # fmt: skip
    expect_equal("".join(chunks), info["new_text"], what="stream_decode(the generated ids), joined",
                 inputs=f"ids {new}", reread=reread("Streaming decode"))  # fmt: skip


# ------------------------------------------------------------------------------------ extension: train a BPE


def plain_bpe_training(text: str, vocab_size: int, specials: list[str], *, tie=min, weighted: bool = True,
                       cut_specials: bool = True, normalize: bool = True, right_to_left: bool = False,
                       specials_in_vocab: bool = True) -> list[tuple[str, str]]:  # fmt: skip
    """The training loop written plainly (recount everything after each merge); the keywords make classic bugs."""
    parts = regex.split("|".join(map(regex.escape, specials)), text) if specials and cut_specials else [text]
    pieces = Counter()
    for part in parts:
        part = unicodedata_nfc(part) if normalize else part
        pieces.update(regex.findall(SPLIT, part))
    table = byte_table()
    words = Counter(
        {tuple(table[b] for b in p.encode("utf-8")): (n if weighted else 1) for p, n in pieces.items()}
    )
    n_merges = vocab_size - 256 - (len(specials) if specials_in_vocab else 0)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, n in words.items():
            for i in range(len(w) - 1):
                pairs[w[i], w[i + 1]] += n
        if not pairs:
            break
        top = max(pairs.values())
        best = tie(p for p in pairs if pairs[p] == top)
        merges.append(best)
        merged = Counter()
        for w, n in words.items():
            w = w[::-1] if right_to_left else w
            pair = best[::-1] if right_to_left else best
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(w[i + 1] + w[i] if right_to_left else w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out[::-1] if right_to_left else out)] += n
        words = merged
    return merges


SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def unicodedata_nfc(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", text)


@functools.cache
def byte_table() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def bpe_training_cases() -> list[tuple[str, int, list[str]]]:
    rng = np.random.default_rng(1)
    letters = "ab c"
    random_words = " ".join("".join(rng.choice(list(letters), size=rng.integers(1, 9))) for _ in range(200))
    return [
        ("aaab aaab", 258, []),  # the docstring's example
        ("aaaa aaaaa aaaaaaa b bb bbbb abab ababab", 262, []),  # runs: left to right, no overlaps
        ("xy ba ab cd dc yx", 263, []),  # every pair once: the tie-break alone decides
        (
            "the cat<|endoftext|>the hat<|endoftext|>at at",
            262,
            ["<|endoftext|>"],
        ),  # no merge across the special
        ("cafe\u0301 cafe\u0301 café", 262, []),  # NFC: three times the same word
        (random_words, 300, []),
    ]


def bpe_training_mistakes(text: str, vocab_size: int, specials: list[str]) -> list[Mistake]:
    def wrong(**bug):
        return lambda: plain_bpe_training(text, vocab_size, specials, **bug)

    return [
        Mistake("ties broken towards the greatest pair", wrong(tie=max),
                "Among pairs of equal count take the one that sorts FIRST: min(...), not max(...)."),
        Mistake("each distinct piece counted once", wrong(weighted=False),
                "A piece that occurs n times adds n to the count of each of its pairs."),
        Mistake("special tokens left in the text", wrong(cut_specials=False),
                "Split the text on the special tokens before pre-tokenizing, so no merge learns their characters."),
        Mistake("the special tokens not counted in vocab_size", wrong(specials_in_vocab=False),
                "vocab_size = 256 bytes + the special tokens + the merges."),
        Mistake("no NFC normalisation", wrong(normalize=False),
                "unicodedata.normalize('NFC', part) before pre-tokenizing, as the encoder does."),
        Mistake("occurrences merged right to left", wrong(right_to_left=True),
                "Merge left to right: 'a a a' becomes 'aa a'."),
    ]  # fmt: skip


def test_train_bpe(course):
    """Extension: train a BPE (the merges of a plain trainer, ties included)"""
    section = reread("Extension: train your own BPE")
    for text, vocab_size, specials in bpe_training_cases():
        inputs = f"train_bpe({text[:60]!r}{'…' if len(text) > 60 else ''}, {vocab_size}, {specials})"
        want = plain_bpe_training(text, vocab_size, specials)
        got = call(course.ch01.train_bpe, text, vocab_size, list(specials), what="train_bpe", inputs=inputs,
                   reread=section)  # fmt: skip
        if isinstance(got, list):
            got = [tuple(p) if isinstance(p, list) else p for p in got]
        expect_equal(got, want, what="the merges your trainer learned", inputs=inputs, reread=section,
                     mistakes=bpe_training_mistakes(text, vocab_size, specials))  # fmt: skip
