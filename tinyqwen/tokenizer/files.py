"""Reading the tokenizer files: vocab.json, merges.txt, tokenizer_config.json and tokenizer.json.

A Hugging Face model folder ships its tokenizer in one of two layouts, and tinyqwen reads both:

    tokenizer.json                 everything in one file: the pipeline, model.vocab, model.merges, added_tokens
    vocab.json + merges.txt        the same vocabulary and merges as two plain files, with the added tokens in
      + tokenizer_config.json      tokenizer_config.json's "added_tokens_decoder" (which also names eos and pad)

Here are the small parsers each layout needs; each refuses bad input with one line that names the file (and the
line, for merges.txt). `read_tokenizer_json` and `read_vocab_merges` put them together into `Tokenizer`'s arguments
(`Tokenizer.from_pretrained` picks the layout), and `check_pipeline` refuses a tokenizer.json that describes another
pipeline than the one tinyqwen implements. The parsed pieces:

    vocab    {"Ġhello": 23811, ...}               regular tokens, written in byte stand-ins
    merges   ([("Ġ", "t"), ...], origin)          pairs in rank order (rank 0 = the first merge learned), and
                                                  rank -> "merges.txt line N" for error messages
    added    [AddedToken(151643, "<|endoftext|>", special=True), ...]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyqwen.errors import TokenizerError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # tinyqwen/data: the official Qwen3 files


def read_json(path: Path):
    """A JSON file's content; a file that cannot be read, is not UTF-8 or not JSON is one TokenizerError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def parse_vocab(obj, where: str) -> dict[str, int]:
    """vocab.json's object (or tokenizer.json's model.vocab), checked: token -> a distinct integer id >= 0."""
    if not isinstance(obj, dict) or not obj:
        raise TokenizerError(f"{where}: the vocabulary must be a non-empty JSON object of token -> id")
    seen: dict[int, str] = {}
    for token, i in obj.items():
        if type(i) is not int or i < 0:
            raise TokenizerError(f"{where}: token {token!r} has id {i!r}; ids must be integers >= 0")
        if i in seen:
            raise TokenizerError(f"{where}: id {i} is used by both {seen[i]!r} and {token!r}")
        seen[i] = token
    return dict(obj)


Merges = tuple[list[tuple[str, str]], Callable[[int], str]]  # pairs in rank order; rank -> "file line N"


def read_merges_txt(path: Path) -> Merges:
    """merges.txt: an optional "#version" line, then one "left right" pair per line, best (rank 0) first."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    pairs, numbers = [], []
    for number, line in enumerate(lines, start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"{path} line {number}: expected two tokens separated by one space, got {line!r}"
            )
        pairs.append((parts[0], parts[1]))
        numbers.append(number)
    if not pairs:
        raise TokenizerError(f"{path}: no merges found")
    return pairs, lambda rank: f"{path} line {numbers[rank]}"


def json_merges(obj, where: str) -> Merges:
    """tokenizer.json's model.merges: [["Ġ", "t"], ...] (or older files' ["Ġ t", ...]), best (rank 0) first."""
    if not isinstance(obj, list):
        raise TokenizerError(f"{where}: model.merges must be a list")
    pairs = []
    for k, m in enumerate(obj):
        if isinstance(m, str):  # older files write "left right"
            m = m.split(" ")
        if not (isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) and s for s in m)):
            raise TokenizerError(f"{where}: model.merges[{k}] is {m!r}; expected two non-empty tokens")
        pairs.append((m[0], m[1]))
    return pairs, lambda rank: f"{where} model.merges[{rank}]"


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole in the raw text, before normalisation and splitting. `special` ones are dropped
    by `decode(..., skip_special_tokens=True)`; the others (`<think>`, `<tool_call>`, ...) never are."""

    id: int
    content: str
    special: bool


def parse_added(entries: list[tuple[int, dict]], where: str) -> list[AddedToken]:
    """(id, {"content": ..., "special": ...}) entries as AddedTokens; only Qwen's plain matching is supported."""
    added = []
    for i, entry in entries:
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not content:
            raise TokenizerError(f"{where}: added token {i} has no 'content' string")
        for flag in ("lstrip", "rstrip", "single_word", "normalized"):
            if entry.get(flag, False):
                raise TokenizerError(
                    f"{where}: added token {content!r} has {flag}=true; tinyqwen supports the Qwen layout, "
                    "where all of lstrip, rstrip, single_word and normalized are false"
                )
        added.append(AddedToken(i, content, bool(entry.get("special", False))))
    return added


def token_content(value) -> str | None:
    """A token named by tokenizer_config.json, written "<|im_end|>" or {"content": "<|im_end|>", ...}; else None."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------ the two layouts


def read_tokenizer_json(path: Path, config: dict | None, split_pattern: str) -> dict[str, Any]:
    """tokenizer.json, with eos, pad and padding_side from tokenizer_config.json when there is one, as the keyword
    arguments of `Tokenizer`. `split_pattern` is the pre-tokenizer regex the file must name (see `check_pipeline`).
    """
    tj = read_json(path)
    if not isinstance(tj, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    check_pipeline(tj, str(path), split_pattern)
    vocab = parse_vocab(tj["model"].get("vocab"), f"{path} model.vocab")
    merges = json_merges(tj["model"].get("merges"), str(path))
    entries = tj.get("added_tokens") or []
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and type(e.get("id")) is int for e in entries
    ):
        raise TokenizerError(f"{path}: added_tokens must be a list of objects with an integer 'id'")
    added = parse_added([(e["id"], e) for e in entries], f"{path} added_tokens")
    return {
        "vocab": vocab,
        "merges": merges,
        "added": added,
        **_config_fields(config or {}),
        "source": str(path),
    }


def read_vocab_merges(folder: Path, config: dict) -> dict[str, Any]:
    """vocab.json + merges.txt, with the added tokens, eos, pad and padding_side of tokenizer_config.json (already
    read: `config`), as the keyword arguments of `Tokenizer`."""
    config_path = folder / "tokenizer_config.json"
    vocab = parse_vocab(read_json(folder / "vocab.json"), str(folder / "vocab.json"))
    merges = read_merges_txt(folder / "merges.txt")
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict) or not all(str(k).isdigit() for k in decoder):
        raise TokenizerError(
            f"{config_path}: added_tokens_decoder must map ids (as strings) to token objects"
        )
    entries = sorted((int(k), v) for k, v in decoder.items())
    added = parse_added(entries, f"{config_path} added_tokens_decoder")
    return {"vocab": vocab, "merges": merges, "added": added, **_config_fields(config), "source": str(folder)}


def _config_fields(config: dict) -> dict[str, Any]:
    """eos_token, pad_token and padding_side of tokenizer_config.json ("right" when it names no side)."""
    return {
        "eos_token": token_content(config.get("eos_token")),
        "pad_token": token_content(config.get("pad_token")),
        "padding_side": config.get("padding_side", "right"),
    }


def _expect(where: str, what: str, got, want) -> None:
    if got != want:
        raise TokenizerError(
            f"{where}: {what} is {json.dumps(got)[:200]}; expected {json.dumps(want)[:200]} "
            "(tinyqwen implements the Qwen2/Qwen3 byte-level BPE pipeline only)"
        )


def check_pipeline(tj: dict, where: str, split_pattern: str) -> None:
    """Refuse a tokenizer.json whose pipeline is not the one implemented here, rather than tokenize wrongly.

    The pipeline: NFC, then Split(`split_pattern`, the pre-tokenizer regex of pretokenize.py), ByteLevel bytes,
    BPE with plain merges, and the ByteLevel decoder.
    """
    model = tj.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"{where}: no 'model' object")
    _expect(where, "model.type", model.get("type"), "BPE")
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(
                f"{where}: model.{key} is {model[key]!r}; tinyqwen supports only an empty value"
            )
    for key in ("byte_fallback", "ignore_merges"):
        if model.get(key):
            raise TokenizerError(f"{where}: model.{key} is true; tinyqwen supports only false")
    _expect(where, "normalizer", tj.get("normalizer"), {"type": "NFC"})
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2:
        _expect(where, "pre_tokenizer", pre, "Sequence of Split(Qwen2 regex) and ByteLevel")
    split, byte_level = steps
    _expect(where, "pre_tokenizer Split", split, {
        "type": "Split", "pattern": {"Regex": split_pattern}, "behavior": "Isolated", "invert": False,
    })  # fmt: skip
    _expect(where, "pre_tokenizer ByteLevel type", byte_level.get("type"), "ByteLevel")
    _expect(where, "pre_tokenizer ByteLevel.use_regex", byte_level.get("use_regex"), False)
    _expect(where, "pre_tokenizer ByteLevel.add_prefix_space", byte_level.get("add_prefix_space"), False)
    _expect(where, "decoder type", (tj.get("decoder") or {}).get("type"), "ByteLevel")


GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type values


def gguf_tokenizer_fields(metadata: dict, where: str) -> dict[str, Any]:
    """A GGUF file's tokenizer keys (`tokenizer.ggml.*`) as the keyword arguments of `Tokenizer`.

    llama.cpp's converter lists every id's token string (`tokens`, padded to the model's vocab_size with UNUSED
    `[PADi]` entries, which are dropped here), a type per id (NORMAL for BPE tokens; CONTROL and USER_DEFINED for
    the added ones, CONTROL becoming `special`), the merges as "left right" strings in rank order, and the special
    ids. Only Qwen's byte-level BPE ("gpt2" model, "qwen2" pre-tokenizer) is accepted.
    """
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in ("qwen2", None):
        raise TokenizerError(
            f"{where}: tokenizer.ggml.model {model!r} with pre-tokenizer {pre!r}; tinyqwen implements Qwen's "
            "byte-level BPE ('gpt2' with 'qwen2')"
        )
    tokens, types, merges = (metadata.get(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    if isinstance(tokens, Sequence) and not isinstance(tokens, (str, list)):
        tokens = list(
            tokens
        )  # (the GGUF reader's StringArray, read now, once: the vocabulary keeps these strings)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.tokens must be an array of strings")
    if types is None or len(types) != len(tokens):
        raise TokenizerError(
            f"{where}: tokenizer.ggml.token_type must give one type per token ({len(tokens)})"
        )
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (token, kind) in enumerate(zip(tokens, (int(t) for t in types), strict=True)):
        if kind == GGUF_NORMAL:
            vocab[token] = i
        elif kind in (GGUF_CONTROL, GGUF_USER_DEFINED):
            added.append(AddedToken(i, token, kind == GGUF_CONTROL))
        elif kind != GGUF_UNUSED:
            raise TokenizerError(
                f"{where}: token {i} ({token!r}) has type {kind}, not one Qwen's tokenizer uses"
            )
    if not isinstance(merges, Sequence) or isinstance(merges, str):  # (a StringArray: one string at a time)
        raise TokenizerError(f"{where}: tokenizer.ggml.merges must be an array of strings")
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise TokenizerError(f"{where}: tokenizer.ggml.merges[{rank}] is {merge!r}, not 'left right'")
        pairs.append((parts[0], parts[1]))

    def content(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise TokenizerError(f"{where}: tokenizer.ggml.{key} {int(i)} is not a token id")
        return tokens[int(i)]

    return {
        "vocab": vocab,
        "merges": (pairs, lambda rank: f"{where} tokenizer.ggml.merges[{rank}]"),
        "added": added,
        "eos_token": content("eos_token_id"),
        "pad_token": content("padding_token_id"),
        "source": where,
    }
