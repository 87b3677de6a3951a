"""Capstone of part I (chapters 1-2): a tokenizer from the files a checkpoint ships, with no scaffolding.

Chapter 1 handed you the vocabulary, the merges and the added tokens already parsed, one function at a time. A
real checkpoint folder holds files instead: `vocab.json`, `merges.txt` and `tokenizer_config.json` (tinyqwen/data
holds Qwen3's, exactly as Hugging Face ships them). Read them yourself and turn text into the ids the official
tokenizer gives, and ids back into text. Grade with

    pytest exercises/test_ch18_capstone_files.py

Graded against the official `tokenizers` library's ids (exercises/references/ch01_tokenization.json): plain text
in several scripts, text with added tokens written in it, a whole chat prompt, and decoding.

Rules: the standard library, NumPy and `regex` only; nothing from tinyqwen. Your chapter 1 functions are fair game
(importing them is reuse, not scaffolding). The pre-tokenizer regex lives in tokenizer.json, which this folder
does not have, so it is given below.
"""

from __future__ import annotations

import os

SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def encode_with_files(folder: str | os.PathLike, text: str) -> list[int]:
    """The official tokenizer's ids of `text`, using only the three files in `folder`.

    Added tokens written in the text ("<|im_start|>", "<think>", ...) become their own ids, as the official
    tokenizer does by default.
    """
    raise NotImplementedError


def decode_with_files(folder: str | os.PathLike, ids: list[int]) -> str:
    """The text of `ids` (regular and added tokens), using only the three files in `folder`."""
    raise NotImplementedError
