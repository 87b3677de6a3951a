"""Loading what a command needs: the model (from a folder or a Hub id) and its tokenizer, checked against each other.

The tokenizer is found before the weights are read, so a missing or mismatched tokenizer fails in a moment, not
after loading gigabytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tinyqwen.errors import TokenizerError
from tinyqwen.hub import resolve_model

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
QWEN3_TOKENS = 151669  # ids 0..151668 of the Qwen3 tokenizer (151,643 BPE tokens + 26 added ones)
QWEN_EOS_IDS = (151643, 151645)  # <|endoftext|> (base models), <|im_end|> (chat models)


def load_tokenizer(model_dir: Path, tokenizer_dir: str | None = None, config=None):
    """The tokenizer for a model: --tokenizer DIR, else the checkpoint's own files, else (see below) the Qwen3
    tokenizer shipped with tinyqwen. With the model's `config`, its vocabulary is checked to fit the model's.

    Decision: a checkpoint without tokenizer files whose config.json is a Qwen3 one (model_type qwen3 or
    qwen3_moe, at least the 151,669 rows that the Qwen3 tokenizer's ids need, Qwen's eos ids) gets the bundled
    Qwen3 tokenizer, with a one-line note on stderr saying so: every official Qwen3 model, dense or MoE, uses that
    one tokenizer. Any other checkpoint gets an error asking for --tokenizer DIR, since a tokenizer guessed for
    an unknown vocabulary would give wrong ids without a word.
    """
    from tinyqwen.gguf_checkpoint import is_gguf
    from tinyqwen.tokenizer import Tokenizer

    if tokenizer_dir:
        folder = Path(tokenizer_dir).expanduser()
        where = f"--tokenizer {tokenizer_dir}"
        if not has_tokenizer_files(folder):
            raise TokenizerError(
                f"{where}: no tokenizer files there (tokenizer.json, or vocab.json + merges.txt)"
            )
        tokenizer = Tokenizer.from_pretrained(folder)
    elif is_gguf(model_dir) and model_dir.is_file():
        where = f"the tokenizer in {model_dir}"
        tokenizer = Tokenizer.from_gguf(model_dir)
    elif has_tokenizer_files(model_dir):
        where = f"the tokenizer in {model_dir}"
        tokenizer = Tokenizer.from_pretrained(model_dir)
    elif config is not None and looks_like_qwen3(config):
        print(
            f"tinyqwen: note: {model_dir} has no tokenizer files; using the Qwen3 tokenizer shipped with tinyqwen "
            "(--tokenizer DIR picks another)",
            file=sys.stderr,
        )
        return Tokenizer.qwen3()
    else:
        raise TokenizerError(
            f"{model_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "pass --tokenizer DIR pointing at this model's tokenizer"
        )
    if config is not None and tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"{where} has {tokenizer.vocab_size:,} tokens but the model has only {config.vocab_size:,} "
            "(vocab_size in its config.json), so most ids would be out of range: use the model's own tokenizer"
        )
    return tokenizer


def has_tokenizer_files(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer: tokenizer.json, or vocab.json with merges.txt."""
    return any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES)


def looks_like_qwen3(config) -> bool:
    """Whether a config.json is one of the Qwen3 family's, so that the Qwen3 tokenizer fits it."""
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return (
        config.model_type in ("qwen3", "qwen3_moe")
        and config.vocab_size >= QWEN3_TOKENS
        and all(e in QWEN_EOS_IDS for e in eos)
    )


def load(args, need_tokenizer: bool = True):
    """(model, tokenizer or None) for --model/--backend/--tokenizer. The tokenizer is loaded and checked against
    config.json before the weights are read, so a mismatch fails in a moment, not after loading gigabytes."""
    import tinyqwen
    from tinyqwen.gguf_checkpoint import load_any_config as load_config

    path = resolve_model(args.model)
    tokenizer = None
    if need_tokenizer:
        tokenizer = load_tokenizer(path, getattr(args, "tokenizer", None), load_config(path))
    model = tinyqwen.load_model(
        path, backend=args.backend, matmul_precision=getattr(args, "matmul_precision", "highest")
    )
    return model, tokenizer


def eos_ids(model) -> tuple[int, ...]:
    """The ids that end a reply: generation_config.json's eos_token_id, else config.json's (none: ())."""
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)
