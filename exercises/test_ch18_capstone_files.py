"""Part I capstone checkpoints: a tokenizer read from the files a checkpoint ships, against the official ids.

Expected ids and texts: the official Hugging Face `tokenizers` library on Qwen3's tokenizer.json
(exercises/references/ch01_tokenization.json, made by exercises/references/make_ch01_tokenization.py). Ids and
text are compared exactly.
"""

from __future__ import annotations

from exercises.grading import REPO, Mistake, call, expect_equal, notebook, reference_file

REF = reference_file("ch01_tokenization.json")
FOLDER = (
    REPO / "tinyqwen" / "data"
)  # vocab.json, merges.txt, tokenizer_config.json as Hugging Face ships them
IDS = notebook(1, "From text to ids")
ADDED = notebook(1, "Added and special tokens")
DECODING = notebook(1, "Decoding")


def test_encode_plain_text(course):
    """Ids of plain text in several scripts, read from the files"""
    for case in REF["encode"]:
        got = call(course.ch18.encode_with_files, FOLDER, case["text"], reread=IDS,
                   what=f"encode_with_files(tinyqwen/data, {case['text'][:40]!r})",
                   hints={KeyError: "a symbol is not in vocab.json: are the merges applied in rank order (line "
                                    "order of merges.txt, header skipped) and the bytes written as their stand-ins?"})  # fmt: skip
        expect_equal(got, case["ids"], what=f"encode_with_files({case['text'][:40]!r}) against the official tokenizer",
                     reread=IDS)  # fmt: skip


def test_encode_added_tokens(course):
    """Added tokens written in the text, and a whole chat prompt"""
    for case in REF["added"]:
        got = call(course.ch18.encode_with_files, FOLDER, case["text"], reread=ADDED,
                   what=f"encode_with_files({case['text'][:40]!r})")  # fmt: skip
        expect_equal(got, case["ids"], what=f"encode_with_files({case['text'][:40]!r}): added tokens", reread=ADDED,
                     mistakes=[Mistake("the added tokens were tokenized as plain text", case["ids_as_plain_text"],
                                       "tokenizer_config.json's added_tokens_decoder lists them: find them in the "
                                       "raw text first, longest first, and give each its own id.")])  # fmt: skip
    chat = REF["real_pipeline"]
    got = call(
        course.ch18.encode_with_files,
        FOLDER,
        chat["text"],
        reread=ADDED,
        what="encode_with_files(a chat prompt)",
    )
    expect_equal(got, chat["ids"], what="encode_with_files: a whole chat prompt", reread=ADDED)


def test_decode(course):
    """Ids back to text, regular and added tokens"""
    cases = REF["decode"] + [{"ids": c["ids"], "text": c["text"]} for c in REF["added"]]
    for case in cases:
        got = call(course.ch18.decode_with_files, FOLDER, list(case["ids"]), reread=DECODING,
                   what=f"decode_with_files({case['ids'][:6]}...)")  # fmt: skip
        expect_equal(
            got, case["text"], what="decode_with_files against the official tokenizer", reread=DECODING
        )
