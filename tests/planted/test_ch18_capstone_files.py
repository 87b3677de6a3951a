"""Planted mistakes for the part I capstone: a tokenizer that ignores the added tokens is caught and named."""

from __future__ import annotations

import exercises.solutions.ch18_capstone_files as solution
import exercises.test_ch18_capstone_files as grading
from exercises.solutions.ch01_tokenization import encode_ordinary


def added_as_plain_text(folder, text):
    vocab, ranks, _, _ = solution._files(str(folder.resolve()))
    return encode_ordinary(text, vocab, ranks)


def test_added_tokens_as_plain_text(solutions, assert_caught):
    buggy = solutions.with_overrides("ch18", encode_with_files=added_as_plain_text)
    assert_caught(grading.test_encode_added_tokens, buggy, hint="as plain text")
