"""The tokenizer chapter: ids identical to the reference, round trips, streaming, loading and bad input.

Independent expectations: the llama.cpp vectors (tests/data/ggml-vocab-qwen2.gguf*), made upstream with HF
`AutoTokenizer`. Live expectations: the official `tokenizers` library on the official tokenizer.json, which
tests/official_tokenizer.py rebuilds byte for byte (sha256 checked) from the files in tinyqwen/data, so every test
runs on a fresh clone with nothing beside it.
"""

from __future__ import annotations

import codecs
import copy
import doctest
import hashlib
import importlib
import json
import os
import pkgutil
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from official_tokenizer import OFFICIAL_SHA256, write_official_tokenizer_json
from tokenizer_corpus import ADDED, mixed_documents

import tinyqwen
from tinyqwen import tokenizer as T
from tinyqwen.errors import TokenizerError
from tinyqwen.tokenizer import Tokenizer, bpe, pretokenize

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
PACKAGE_DATA = REPO / "tinyqwen" / "data"
N_TOKENS = 151669


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.qwen3()


@pytest.fixture(scope="session")
def official_json(tmp_path_factory) -> Path:
    """The official tokenizer.json (rebuilt from tinyqwen/data by `tokenizers`; its sha256 is the Hub file's)."""
    pytest.importorskip("tokenizers", reason="the dev dependency `tokenizers` is not installed")
    return write_official_tokenizer_json(tmp_path_factory.mktemp("official") / "tokenizer.json")


@pytest.fixture(scope="session")
def ref(official_json):
    """The official HF `tokenizers` on the official tokenizer.json."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(official_json))


def test_rebuilt_tokenizer_json_is_the_official_file(official_json):
    assert hashlib.sha256(official_json.read_bytes()).hexdigest() == OFFICIAL_SHA256
    shared = [Path(os.environ["TINYQWEN_SHARED"])] if os.environ.get("TINYQWEN_SHARED") else []
    for root in [
        *shared,
        REPO.parent / "shared",
    ]:  # where a copy of the official file is at hand, compare too
        copy = root / "qwen3-tokenizer" / "tokenizer.json"
        if copy.is_file():
            assert copy.read_bytes() == official_json.read_bytes(), copy


def ref_ids(ref, text: str) -> list[int]:
    return ref.encode(text, add_special_tokens=False).ids


def nfc_between_added(text: str) -> str:
    """What decode(encode(text)) must give: NFC of the text between added tokens (those are matched in the raw
    text first, so NFC never joins them to a neighbour: "<think>" + U+0338 does not become "<think≯").
    `T.nfc` is `unicodedata`'s NFC made to match the reference's older tables (checked against it below)."""
    added = sorted(Tokenizer.qwen3().special_tokens, key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, added)) + ")", text)
    return "".join(p if i % 2 else T.nfc(p) for i, p in enumerate(parts))


# ------------------------------------------------------------------------------------------ data & facts


def test_packaged_files_are_the_official_bytes():
    want = {  # sha256 of the official Hub files (see the shared README / SHA256SUMS)
        "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
        "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
        "tokenizer_config.json": "d5d09f07b48c3086c508b30d1c9114bd1189145b74e982a265350c923acd8101",
    }
    for name, digest in want.items():
        assert hashlib.sha256((PACKAGE_DATA / name).read_bytes()).hexdigest() == digest, name


def test_vocabulary_facts(tok):
    assert len(tok) == tok.vocab_size == N_TOKENS
    assert len(tok.special_tokens) == 26
    assert tok.special_tokens["<|endoftext|>"] == 151643 and tok.special_tokens["</think>"] == 151668
    assert (tok.token_to_id("<think>"), tok.token_to_id("</think>")) == (151667, 151668)
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok.id_to_token(151645) == "<|im_end|>" and tok.id_to_token(9707) == "Hello"
    assert tok.token_to_id("no such token") is None
    specials = {t.content for t in tok.added_tokens.values() if t.special}
    assert "<|im_start|>" in specials and "<think>" not in specials and "<tool_call>" not in specials
    assert len(specials) == 14


def test_public_api_name(tok):
    assert tinyqwen.Tokenizer is Tokenizer
    assert Tokenizer.from_pretrained(PACKAGE_DATA).encode("Hello world") == [9707, 1879]


def test_doctests_hold():
    """The worked examples in the chapter's docstrings are true, in every module of the tokenizer package."""
    attempted = 0
    for info in pkgutil.iter_modules(T.__path__, "tinyqwen.tokenizer."):
        result = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, info.name
        attempted += result.attempted
    assert attempted > 15


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    table = T.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert T.symbols_to_bytes(T.text_to_symbols("a é 😀\n")) == "a é 😀\n".encode()


# ------------------------------------------------------------------------------------------ independent vectors


def llama_cases(stem: str) -> list[tuple[str, list[int]]]:
    inp = (DATA / f"{stem}.inp").read_text(encoding="utf-8")
    out = (DATA / f"{stem}.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(x) for x in line.split()] for line in out.split("\n")[:-1]]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids, strict=True))


@pytest.mark.parametrize("stem", ["ggml-vocab-qwen2.gguf", "ggml-vocab-qwen2.gguf.v2024"])
def test_llama_cpp_vectors(tok, stem):
    for text, want in llama_cases(stem):
        assert tok.encode(text) == want, repr(text)
        assert tok.decode(want) == unicodedata.normalize("NFC", text), repr(text)


def test_hf_transformers_vectors(tok):
    path = DATA / "hf_transformers_vectors.json"
    cases = json.loads(path.read_text(encoding="utf-8"))["encode"]
    assert len(cases) >= 10
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert [tok.id_to_token(i) for i in case["ids"]] == case["tokens"]
        assert tok.decode(case["ids"]) == case["decoded"]


# ------------------------------------------------------------------------------------------ against `tokenizers`

EDGE_CASES = [
    "",
    "<|im_start|><|im_start|>",
    "<think></think>",
    "<think>\n\n</think>\n\n",
    " <|im_end|> x",
    "a<|im_end|>b",
    "<|im_end|>\n<|im_start|>assistant\n",
    "<<|im_end|>>",
    "<|im_end",
    "<|im_end|",
    "<think>\u0338",  # NFC would turn ">" + U+0338 into "≯" if it ran before added tokens are found
    "<|im_end|>\u0301é",
    "x\u0301<think>",
    "<tool_call>\n{}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    " " * 5000 + "x",
    "\t\t\n\n  \r\n\r\n   \n",
    "1234567890" * 50,
    "a" * 3000,
    "漢" * 2000,
    "'s 'S 'll 'LL 're ' ve ſ 'ſ",
    "👨‍👩‍👧‍👦🏳️‍🌈👍🏽🇫🇷1️⃣",
    "e\u0301 \u1100\u1161\u11a8 \U00011935\U00011930 \U000105d2\u0307 \U00016d67\U00016d67",
    "\U000323b0\U00010940 new Unicode 17 letters",
    "\x00\x01\x1c\x1f\x7f\x85\u2028\u2029\ufeff",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_reference(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref_ids(ref, text)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == nfc_between_added(text)


def test_one_megabyte_of_mixed_text_matches_reference(tok, ref):
    docs = mixed_documents(1_100_000, seed=0)
    assert sum(len(d.encode()) for d in docs) >= 1_000_000
    for k, doc in enumerate(docs):
        ids = tok.encode(doc)
        want = ref_ids(ref, doc)
        if ids != want:  # point at the first different token, not at a 10 KB diff
            i = next(i for i, (a, b) in enumerate(zip(ids + [-1], want + [-1], strict=False)) if a != b)
            context = tok.decode(want[max(0, i - 5) : i + 5])
            pytest.fail(f"document {k}: first difference at token {i}, near {context!r}")
        assert tok.decode(ids) == nfc_between_added(doc), f"document {k}"


@pytest.mark.slow
def test_every_code_point_normalises_like_reference(ref):
    """NFC of every code point, after a letter and among combining marks of several classes: catches the
    reference's older normalisation tables (marks it does not reorder, compositions it does not make)."""
    normalizers = pytest.importorskip("tokenizers.normalizers")
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]
    text = "\x00".join(f"a{c}b x\u0345{c}\u0316\u0334{c}{c}" for c in chars)
    assert T.nfc(text) == normalizers.NFC().normalize_str(text)


def test_code_points_split_like_reference(ref):
    """Every code point where `regex`'s Unicode tables disagree with the reference's, plus a sample of the rest,
    in contexts that exercise each alternative of the split regex. (All code points: 70 s in the reference.)"""
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    from tokenizers import Regex

    disputed = sorted(pretokenize._disputed()[1])
    assert len(disputed) < 50_000
    sample = [c for c in range(1, 0x110000, 37) if not 0xD800 <= c < 0xE000]
    chars = [chr(c) for c in sorted(set(disputed + sample + list(range(1, 0x3000))))]
    text = "\x00".join(f"a{c}b {c}1'{c}{c}x  {c}\n{c} " for c in chars)
    split = pre_tokenizers.Split(Regex(T.QWEN2_SPLIT_PATTERN), behavior="isolated")
    assert T.pre_tokenize(text) == [piece for piece, _ in split.pre_tokenize_str(text)]


def test_pinned_unicode_classes_are_the_reference_engines(ref):
    """data/unicode_classes.json holds \\p{L}, \\p{N}, \\s as the installed `tokenizers` (Oniguruma) sees them."""
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    from tokenizers import Regex

    chars = [c for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]
    text = "\x00".join(map(chr, chars))
    data = pretokenize._unicode_data()
    for name, pattern in (("L", r"\p{L}"), ("N", r"\p{N}"), ("s", r"\s")):
        kept = pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text)
        outside = set("".join(piece for piece, _ in kept))
        members = [c for c in chars if chr(c) not in outside]
        pinned = [c for a, b in data[name] for c in range(a, b + 1)]
        assert members == pinned, name


PLANE_TEXT = st.text(st.characters(codec="utf-8"), max_size=60)  # any code point but surrogates
SPECIAL_MIX = st.lists(
    st.one_of(
        st.sampled_from(
            ADDED + ["<|im_end", "<think", "|>", "<", ">", "\u0338", "\u0301", " ", "\n", "\r\n", "'s"]
        ),
        PLANE_TEXT,
        st.text(st.sampled_from("aé ёя漢😀\u200d🏽1٣\t\n'"), max_size=20),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(PLANE_TEXT, SPECIAL_MIX))
@example(text="<|im_start|><|im_start|>\u0301")
def test_random_unicode_matches_reference(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref_ids(ref, text)
    assert tok.decode(ids) == nfc_between_added(text)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, N_TOKENS - 1), max_size=30), skip=st.booleans())
def test_decode_matches_reference(tok, ref, ids, skip):
    assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40))
def test_decoding_invalid_utf8_matches_reference(tok, ref, raw):
    """Single-byte tokens spell arbitrary bytes: invalid UTF-8 must give the same "�"s as the reference."""
    ids = [tok.token_to_id(T.bytes_to_unicode()[b]) for b in raw]
    assert tok.decode(ids) == ref.decode(ids)


def test_vocab_merges_config_loads_like_tokenizer_json(tok, official_json, tmp_path):
    shutil.copy(official_json, tmp_path / "tokenizer.json")
    from_json = Tokenizer.from_pretrained(tmp_path)
    assert from_json.vocab == tok.vocab and from_json.ranks == tok.ranks
    assert from_json.added_tokens == tok.added_tokens and len(from_json) == N_TOKENS
    assert from_json.eos_token_id is None  # no tokenizer_config.json next to it: nothing names an eos
    shutil.copy(PACKAGE_DATA / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    from_json = Tokenizer.from_pretrained(tmp_path)
    assert (from_json.eos_token_id, from_json.pad_token_id) == (151645, 151643)
    for doc in mixed_documents(60_000, seed=1) + EDGE_CASES:
        assert from_json.encode(doc) == tok.encode(doc)


# ------------------------------------------------------------------------------------------ BPE


def test_bpe_steps_end_in_the_encoded_tokens(tok):
    for word in [" hello", "tokenization", " Привет", "漢字", " 😀"]:
        steps = tok.bpe_steps(word)
        symbols = tuple(T.text_to_symbols(word))
        for step in steps:  # each step joins one adjacent pair, by its rank in merges.txt
            assert tok.ranks[step.pair] == step.rank
            assert len(step.symbols) == len(symbols) - 1 and "".join(step.symbols) == "".join(symbols)
            assert step.pair[0] + step.pair[1] in step.symbols
            symbols = step.symbols
        assert [tok.token_to_id(s) for s in symbols] == tok.encode(word), word


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from(" \t\nabcé漢😀1"), min_size=bpe._LONG_WORD, max_size=400))
def test_heap_merge_equals_list_merge(tok, text):
    """Long pieces take the heap path; `bpe_steps` runs the plain rescan-every-pair loop on the same symbols."""
    symbols = list(T.text_to_symbols(text))
    steps = tok.bpe_steps(text)
    assert bpe._merge_symbols_heap(symbols, tok.ranks) == list(steps[-1].symbols if steps else symbols)


def test_long_pieces_are_fast_and_right(tok, ref):
    """A 200,000-letter word or space run: the heap merge keeps it well under a second each (no quadratic)."""
    for text in ["x" * 200_000, " " * 200_000 + "a", "ab" * 100_000]:
        assert tok.encode(text) == ref_ids(ref, text)


# ------------------------------------------------------------------------------------------ streaming


def test_stream_decoder_holds_back_a_split_emoji(tok):
    ids = tok.encode("I ❤️ 🦙 tokens 😀!")
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs an emoji split over tokens"
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == "I ❤️ 🦙 tokens 😀!"
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # something was held back while incomplete


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, N_TOKENS - 1), max_size=40), skip=st.booleans())
def test_stream_decoder_concatenation_equals_decode(tok, ids, skip):
    stream = tok.stream_decoder(skip_special_tokens=skip)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(
        ids, skip_special_tokens=skip
    )


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(st.binary(max_size=5), max_size=20))
def test_incomplete_utf8_tail_holds_back_only_unfinished_characters(chunks):
    """Emitting all but the tail, chunk by chunk, adds up to the one-shot decode, and what is held back is a
    character that valid bytes could still finish (Python's strict incremental decoder waits for it too)."""
    full = b"".join(chunks).decode("utf-8", errors="replace")
    buf, shown = bytearray(), ""
    for chunk in chunks:
        buf += chunk
        keep = T.incomplete_utf8_tail(buf)
        shown += buf[: len(buf) - keep].decode("utf-8", errors="replace")
        del buf[: len(buf) - keep]
        assert full.startswith(shown)
        assert len(buf) <= 3
        assert codecs.getincrementaldecoder("utf-8")("strict").decode(bytes(buf), final=False) == ""
    assert shown + buf.decode("utf-8", errors="replace") == full


@settings(max_examples=200, deadline=None)
@given(text=PLANE_TEXT)
def test_stream_of_valid_text_never_shows_a_replacement_character(tok, text):
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == nfc_between_added(text)
    assert sum(p.count("\ufffd") for p in pieces) == text.count("\ufffd")


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [-1, N_TOKENS, 151935, 10**12])
def test_ids_outside_the_vocabulary(tok, bad):
    # ids past the vocabulary (a model's spare embedding rows) decode to "" as in transformers, so a reply that
    # holds one is not lost (tests/test_robustness.py); a negative id is an error, as there
    if bad < 0:
        with pytest.raises(
            TokenizerError, match=rf"token id {bad} is outside the vocabulary \[0, {N_TOKENS}\)"
        ):
            tok.decode([9707, bad])
        with pytest.raises(TokenizerError, match=str(bad)):
            tok.stream_decoder().push(bad)
    else:
        assert tok.decode([9707, bad]) == "Hello" and tok.stream_decoder().push(bad) == ""
    with pytest.raises(TokenizerError, match=str(bad)):
        tok.id_to_token(bad)


def test_decode_and_encode_reject_wrong_types(tok):
    with pytest.raises(TokenizerError, match="not an integer"):
        tok.decode([1.5])
    with pytest.raises(TokenizerError, match="sequence of token ids"):
        tok.decode("hello")
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"hello")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok.encode("ok \ud800 no")


def test_decode_accepts_numpy_ids(tok):
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([9707, 1879])) == "Hello world"


def _tokenizer_dir(tmp_path: Path) -> Path:
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(PACKAGE_DATA / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")  # a checkpoint folder without tokenizer files
    with pytest.raises(
        TokenizerError, match=r"looked for tokenizer\.json.*missing: vocab\.json, merges\.txt"
    ):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("vocab.json", '{"!":0,', '{"!":0,,', r"vocab\.json: not valid JSON"),
        ("vocab.json", '"!":0,', '"!":"zero",', r"vocab\.json.*'!' has id 'zero'"),
        ("vocab.json", '"!":0,', '"!":1,', r"vocab\.json.*id 1 is used by both"),
        ("vocab.json", '"Ġt":259,', "", r"merges\.txt line \d+: token 'Ġt' of merge"),
        (
            "merges.txt",
            "\nĠ Ġ\n",
            "\nĠ Ġ x\n",
            r"merges\.txt line 2: expected two tokens separated by one space",
        ),
        ("merges.txt", "\nĠ Ġ\n", "\nĠ\n", r"merges\.txt line 2: expected two tokens"),
        (
            "merges.txt",
            "\nĠ Ġ\n",
            "\nĠ Ġ\nĠ Ġ\n",
            r"merges\.txt line 2: merge 'Ġ' 'Ġ' appears again at .*merges\.txt line 3",
        ),
        (
            "merges.txt",
            "\nĠ Ġ\n",
            "\nĠ Ġ\nĠ ☃\n",
            r"merges\.txt line 3: token '☃' of merge 'Ġ' '☃' is not in the vocabulary",
        ),
        (
            "tokenizer_config.json",
            '"eos_token": "<|im_end|>"',
            '"eos_token": "<|nope|>"',
            r"eos_token '<\|nope\|>'",
        ),
        ("tokenizer_config.json", '"151643": {', '"x": {', r"tokenizer_config\.json: added_tokens_decoder"),
        (
            "tokenizer_config.json",
            '"add_bos_token"',
            '"add_bos_token',
            r"tokenizer_config\.json: not valid JSON",
        ),
        (
            "tokenizer_config.json",
            '"rstrip": false',
            '"rstrip": true',
            r"tokenizer_config\.json.*rstrip=true",
        ),
    ],
)
def test_malformed_files_are_named(tmp_path, file, old, new, message):
    folder = _tokenizer_dir(tmp_path)
    _edit(folder / file, old, new)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_pretrained(folder)


def test_empty_merges_file(tmp_path):
    folder = _tokenizer_dir(tmp_path)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt: no merges found"):
        Tokenizer.from_pretrained(folder)


def test_malformed_tokenizer_json_is_named(official_json, tmp_path):
    official = json.loads(official_json.read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    changes = [
        (
            lambda tj: tj["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"),
            "pre_tokenizer Split",
        ),
        (lambda tj: tj.update(normalizer=None), "normalizer is null"),
        (lambda tj: tj["model"].update(type="WordPiece"), "model.type"),
        (lambda tj: tj["model"]["merges"].__setitem__(5, ["a"]), r"model\.merges\[5\]"),
        (lambda tj: tj["model"]["vocab"].pop("in"), r"model\.merges\[2\]: token 'in' of merge 'i' 'n'"),
    ]
    for change, message in changes:
        # a fresh copy of every container a change edits (the rest shared): a deep copy of the 11 MB file's
        # objects (a JSON round trip) took longer than the parse under test
        model = dict(
            official["model"],
            vocab=dict(official["model"]["vocab"]),
            merges=list(official["model"]["merges"]),
        )
        tj = dict(official, model=model, pre_tokenizer=copy.deepcopy(official["pre_tokenizer"]))
        change(tj)
        (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ transformers habits
# Expected values: what transformers returns with the official Qwen3 tokenizer, recorded in
# tests/data/injection_vectors.json ("habits") by tests/data/make_injection_vectors.py.

HABITS = json.loads((DATA / "injection_vectors.json").read_text(encoding="utf-8"))["habits"]


@pytest.mark.parametrize("case", HABITS["call"], ids=lambda c: json.dumps(c["kwargs"]))
def test_calling_the_tokenizer_returns_what_transformers_returns(tok, case):
    assert case["padding_side"] == tok.padding_side == "right"
    assert tok(case["text"], **case["kwargs"]) == case["output"]


def test_calling_with_return_tensors_np(tok):
    np = pytest.importorskip("numpy")
    single = tok("Hi there", return_tensors="np")
    assert single["input_ids"].shape == (1, 2) and single["input_ids"].dtype == np.int64
    batch = tok(["Hi there", "a"], padding=True, return_tensors="np")
    assert batch["input_ids"].tolist() == HABITS["call"][-1]["output"]["input_ids"]
    assert batch["attention_mask"].tolist() == HABITS["call"][-1]["output"]["attention_mask"]
    with pytest.raises(TokenizerError, match="pass padding=True"):
        tok(["Hi there", "a"], return_tensors="np")


def test_calling_with_bad_arguments_says_what_is_wrong(tok):
    with pytest.raises(TokenizerError, match="a str or a list of str"):
        tok([1, 2])
    with pytest.raises(TokenizerError, match="padding must be"):
        tok("x", padding="max_length")
    with pytest.raises(TokenizerError, match="padding_side must be"):
        tok("x", padding_side="up")
    with pytest.raises(TokenizerError, match="no torch"):
        tok("x", return_tensors="pt")


def test_batch_decode_matches_transformers(tok):
    case = HABITS["batch_decode"]
    assert tok.batch_decode(case["ids"]) == case["text"]
    assert tok.batch_decode(case["ids"], skip_special_tokens=True) == case["skipped"]
    np = pytest.importorskip("numpy")
    assert tok.batch_decode(np.array([[9707, 1879]])) == ["Hello world"]
    with pytest.raises(TokenizerError, match="sequences of token ids"):
        tok.batch_decode("Hello")


def test_add_special_tokens_is_accepted_and_changes_nothing_for_qwen(tok):
    # Qwen adds no BOS/EOS: transformers gives the same ids either way (recorded), and so do we
    for text, (with_special, without) in HABITS["encode_add_special_tokens"].items():
        assert with_special == without
        assert (
            tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=False) == without
        )
    with pytest.raises(TokenizerError, match="add_special_tokens must be True or False"):
        tok.encode("x", add_special_tokens="no")


def test_apply_chat_template_as_a_tokenizer_method_like_transformers(tok):
    case = HABITS["apply_chat_template_tokenized"]
    assert tok.apply_chat_template(case["messages"], add_generation_prompt=True) == case["output"]
    assert (
        tok.apply_chat_template(case["messages"], add_generation_prompt=True, return_dict=False)
        == case["ids"]
    )
    text = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
    assert text == tinyqwen.apply_chat_template(case["messages"], add_generation_prompt=True)
    pytest.importorskip("numpy")
    arrays = tok.apply_chat_template(case["messages"], add_generation_prompt=True, return_tensors="np")
    assert arrays["input_ids"].tolist() == [case["ids"]] and arrays["attention_mask"].shape == (
        1,
        len(case["ids"]),
    )
    with pytest.raises(TokenizerError, match="tokenize must be True or False"):
        tok.apply_chat_template(case["messages"], tokenize="yes")


def test_padding_side_comes_from_tokenizer_config(tmp_path):
    folder = _tokenizer_dir(tmp_path)
    _edit(
        folder / "tokenizer_config.json",
        '"model_max_length"',
        '"padding_side": "left",\n  "model_max_length"',
    )
    left = Tokenizer.from_pretrained(folder)
    assert left.padding_side == "left"
    assert left(["Hi there", "a"], padding=True)["input_ids"] == [[13048, 1052], [151643, 64]]
    assert left(["Hi there", "a"], padding=True, padding_side="right")["input_ids"] == [
        [13048, 1052],
        [64, 151643],
    ]


def test_from_pretrained_expands_home(tmp_path, monkeypatch):
    (tmp_path / "tok").mkdir()
    _tokenizer_dir(tmp_path / "tok")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Tokenizer.from_pretrained("~/tok").encode("Hello world") == [9707, 1879]


def test_from_pretrained_resolves_a_hub_id_from_the_hugging_face_cache(tmp_path, monkeypatch):
    repo = tmp_path / "models--Qwen--Qwen3-0.6B"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text("{}")
    _tokenizer_dir(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Tokenizer.from_pretrained("Qwen/Qwen3-0.6B").encode("Hello world") == [9707, 1879]
    from tinyqwen.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        Tokenizer.from_pretrained("Qwen/Qwen3-8B")


def test_a_folder_without_tokenizer_files_points_at_the_bundled_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"Tokenizer\.qwen3\(\)"):
        Tokenizer.from_pretrained(tmp_path)
