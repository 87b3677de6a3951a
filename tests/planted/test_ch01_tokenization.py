"""Planted mistakes for chapter 1: plausible tokenizer bugs, each injected into the otherwise-correct solutions, must
fail the grading with the hint written for that bug."""

from __future__ import annotations

import doctest
import re
import unicodedata

import pytest
import regex

import exercises.ch01_tokenization as stubs
import exercises.test_ch01_tokenization as grading
from exercises.solutions import ch01_tokenization as good


def identity_table() -> dict[int, str]:
    return {b: chr(b) for b in range(256)}


def chars_not_bytes(text: str) -> str:
    table = good.bytes_to_unicode()
    return "".join(table.get(ord(c), c) for c in text)  # characters, not the UTF-8 bytes


def gpt4_digits(text: str) -> list[str]:
    return regex.findall(good.SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|"), text)


def case_sensitive_contractions(text: str) -> list[str]:
    return regex.findall(
        good.SPLIT_PATTERN.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "'s|'t|'re|'ve|'m|'ll|'d"), text
    )


def leftmost_bpe(symbols: str, ranks) -> list[str]:
    parts = list(symbols)
    merged = True
    while merged:
        merged = False
        for i in range(len(parts) - 1):
            if (parts[i], parts[i + 1]) in ranks:
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
                merged = True
                break
    return parts


def no_nfc(text: str, vocab, ranks) -> list[int]:
    ids = []
    for piece in good.pretokenize(text):  # forgot unicodedata.normalize("NFC", text)
        ids += [vocab[s] for s in good.bpe(good.to_symbols(piece), ranks)]
    return ids


def added_after_regex(text: str, vocab, ranks, added) -> list[int]:
    return good.encode_ordinary(text, vocab, ranks)  # the added tokens are never looked for


def shortest_added_first(text: str, vocab, ranks, added) -> list[int]:
    """Only a problem where one added token is a prefix of another; Qwen3 has none, so this one must PASS."""
    pattern = re.compile("|".join(map(re.escape, sorted(added, key=len))))
    ids, start = [], 0
    for m in pattern.finditer(text):
        ids += good.encode_ordinary(text[start : m.start()], vocab, ranks) + [added[m.group()]]
        start = m.end()
    return ids + good.encode_ordinary(text[start:], vocab, ranks)


def joined_token_strings(ids, id_to_token) -> str:
    return "".join(id_to_token[i] for i in ids)


def per_token_decode(ids, id_to_token) -> list[str]:
    return [good.decode([i], id_to_token) for i in ids] + [""]


def test_identity_byte_table_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", bytes_to_unicode=identity_table)
    assert_caught(grading.test_bytes_to_unicode, buggy, hint="every byte mapped to chr(byte)")


def test_characters_instead_of_bytes_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", to_symbols=chars_not_bytes)
    assert_caught(grading.test_to_symbols, buggy, hint="mapping characters, not bytes")


def test_gpt4_digit_groups_are_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", pretokenize=gpt4_digits)
    assert_caught(grading.test_pretokenize, buggy, hint="groups of up to 3")


def test_case_sensitive_contractions_are_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", pretokenize=case_sensitive_contractions)
    assert_caught(grading.test_pretokenize, buggy, hint="case-sensitively")


def test_leftmost_merge_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", bpe=leftmost_bpe)
    assert_caught(grading.test_bpe_by_hand, buggy, hint="leftmost mergeable pair first")
    assert_caught(grading.test_bpe_real_merges, buggy, hint="leftmost mergeable pair first")


def test_missing_nfc_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", encode_ordinary=no_nfc)
    assert_caught(grading.test_encode_ordinary, buggy, hint="NFC normalisation not applied")


def test_added_tokens_after_the_regex_are_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", encode=added_after_regex)
    assert_caught(grading.test_encode_added_tokens, buggy, hint="went through the regex")
    assert_caught(grading.test_real_pipeline, buggy, hint="went through the regex")


def test_harmless_variant_passes(solutions):
    """Control: matching added tokens shortest-first is wrong in general but gives Qwen3's ids (no added token is
    a prefix of another), so the grading must accept it — the checks are about ids, not about style."""
    assert not any(a != b and b.startswith(a) for a in grading.files()[2] for b in grading.files()[2])
    grading.test_encode_added_tokens(solutions.with_overrides("ch01", encode=shortest_added_first))


def test_token_strings_as_text_are_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", decode=joined_token_strings)
    assert_caught(grading.test_decode, buggy, hint="joined as text")


def test_per_token_stream_decode_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch01", stream_decode=per_token_decode)
    assert_caught(grading.test_stream_decode, buggy, hint="each token decoded on its own")


def test_nfc_cases_really_change(solutions):
    """The NFC checkpoint's inputs are not already NFC (else it could not catch a missing NFC)."""
    assert all(unicodedata.normalize("NFC", c["text"]) != c["text"] for c in grading.REF["nfc"])


NAMES = [
    "bytes_to_unicode",
    "to_symbols",
    "pretokenize",
    "bpe",
    "encode_ordinary",
    "encode",
    "decode",
    "stream_decode",
]


@pytest.mark.parametrize("name", NAMES)
def test_stub_examples_hold(name):
    """The worked examples in the stubs' docstrings are right (run against the solutions, with the real files)."""
    vocab, ranks, added, id_to_token = grading.files()
    names = {n: getattr(good, n) for n in NAMES}
    data = {"vocab": vocab, "ranks": ranks, "added": added, "id_to_token": id_to_token}
    test = doctest.DocTestParser().get_doctest(getattr(stubs, name).__doc__, names | data, name, None, 0)
    assert test.examples, f"{name} has no worked example"
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
