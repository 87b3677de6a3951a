"""Part I capstone, solved: a tokenizer from vocab.json, merges.txt and tokenizer_config.json, built on the
chapter 1 solutions."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from exercises.solutions.ch01_tokenization import decode, encode

SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@functools.cache
def _files(folder: str) -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, int], dict[int, str]]:
    root = Path(folder)
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))  # {"Ġhello": 23811, ...}
    ranks: dict[tuple[str, str], int] = {}
    for line in (root / "merges.txt").read_text(encoding="utf-8").split("\n"):
        if line and not line.startswith("#version"):  # the header line is not a merge
            left, right = line.split(" ")
            ranks[left, right] = len(ranks)  # a merge's rank is its position: earlier merges win
    config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    # the added tokens live in tokenizer_config.json's "added_tokens_decoder": {"151643": {"content": ...}, ...}
    added = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
    id_to_token = {i: t for t, i in vocab.items()} | {i: t for t, i in added.items()}
    return vocab, ranks, added, id_to_token


def encode_with_files(folder: str | os.PathLike, text: str) -> list[int]:
    vocab, ranks, added, _ = _files(str(Path(folder).resolve()))  # parsed once per folder (151k merges: ~1 s)
    return encode(text, vocab, ranks, added)


def decode_with_files(folder: str | os.PathLike, ids: list[int]) -> str:
    *_, id_to_token = _files(str(Path(folder).resolve()))
    return decode(ids, id_to_token)
