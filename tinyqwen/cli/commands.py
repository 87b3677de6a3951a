"""`tinyqwen verify`, `serve`, `bench` and `train`: each checks its flags, then hands over to the module that does the
work (tinyqwen/verify.py, serve/, bench/, train.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tinyqwen.cli.flags import require_positive
from tinyqwen.cli.loading import load
from tinyqwen.errors import TinyQwenError


def cmd_verify(args) -> int:
    from tinyqwen.gguf_checkpoint import is_gguf
    from tinyqwen.verify import report, transformers_available, verify, verify_stored

    if is_gguf(args.model) and Path(args.model).expanduser().is_file():
        raise TinyQwenError(
            f"{args.model}: verify compares with transformers, which reads a Hugging Face checkpoint folder; a GGUF "
            "file is checked against llama.cpp on the same file (benchmarks/gguf_kl.py: KL and top-1 per position)"
        )
    live = transformers_available()
    if not live and (args.tokens is not None or args.seed is not None):
        raise TinyQwenError(
            "--tokens and --seed choose the random ids of a live comparison with transformers, which is not "
            'installed here (pip install "tinyqwen[crosscheck]"); without them verify uses the stored reference'
        )
    tokens = 16 if args.tokens is None else require_positive("--tokens", args.tokens)
    model, _ = load(args, need_tokenizer=False)
    results = []
    stored = Path(model.path) / "reference.npz"
    if stored.is_file():  # a committed fixture: transformers' outputs recorded when it was made
        results.append(verify_stored(model, stored))
    if live or not results:  # live comparison (says what to install when it cannot run)
        if tokens > model.config.max_position_embeddings:
            raise TinyQwenError(
                f"--tokens {tokens} is longer than the model's context ({model.config.max_position_embeddings})"
            )
        rng = np.random.default_rng(args.seed if args.seed is not None else 0)
        ids = rng.integers(0, min(model.config.vocab_size, 151643), (2, tokens))
        results.append(verify(model, ids))
    print(report(model, str(args.model), results, rtol=args.rtol, atol=args.atol))
    return 0 if all(r.ok(args.rtol, args.atol) for r in results) else 1


def cmd_serve(args) -> int:
    """`tinyqwen serve`: the OpenAI-compatible endpoint of tinyqwen/serve/, until Ctrl-C."""
    from tinyqwen.serve import require_serve_extra, serve

    require_serve_extra()
    if not 0 <= args.port <= 65535:
        raise TinyQwenError(f"--port must be in 0..65535, got {args.port}")
    options = {"max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk, "max_queue": args.max_queue}
    for flag, value in options.items():
        if value is not None and value < (0 if flag == "max_queue" else 1):
            raise TinyQwenError(
                f"--{flag.replace('_', '-')} must be >= {0 if flag == 'max_queue' else 1}, got {value}"
            )
    if args.kv_budget is not None:
        options["kv_budget"] = parse_bytes(args.kv_budget, "--kv-budget")
    options["kv_dtype"] = args.kv_dtype
    model, tokenizer = load(args)
    name = args.served_model_name or str(args.model)
    print(f"tinyqwen serve: {name} ({args.backend}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(model, tokenizer, name, host=args.host, port=args.port, log_level=args.log_level,
          **{k: v for k, v in options.items() if v is not None})  # fmt: skip
    return 0


def parse_bytes(text: str, flag: str) -> int:
    """'4GiB', '512MiB', '1.5G', '1000000' -> bytes (K, M, G with or without 'iB' are powers of 1024).

    >>> parse_bytes("4GiB", "--kv-budget"), parse_bytes("512M", "--kv-budget"), parse_bytes("100", "--kv-budget")
    (4294967296, 536870912, 100)
    """
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise TinyQwenError(f"{flag} must be a size such as 4GiB, 512MiB or a number of bytes, got {text!r}")
    unit = match.group(2).upper()
    value = float(match.group(1)) * (1024 ** ("KMGT".index(unit) + 1) if unit else 1)
    if value < 1:
        raise TinyQwenError(f"{flag} must be at least 1 byte, got {text!r}")
    return int(value)


def cmd_bench(args) -> int:
    from tinyqwen.bench import ENGINE_KINDS, format_report, run_benchmark

    for flag in ("--prompt-tokens", "--new-tokens", "--repeat", "--threads"):
        require_positive(flag, getattr(args, flag[2:].replace("-", "_")))
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()] if args.engines else list(ENGINE_KINDS)
    if not args.peer:
        kinds = [k for k in kinds if k in ("numpy", "numba", "cupy")]
    if args.backend:
        # one of tinyqwen's backends alone: it must be able to run here, or we say why in one line
        from tinyqwen.backends import get_backend

        get_backend(args.backend)
        kinds = [args.backend]
    report = run_benchmark(
        args.model,
        kinds,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        threads=args.threads,
        peer_python=args.peer_python,
        ggufs=[Path(g).expanduser() for g in args.gguf] or None,
        gemv_shape=None if args.no_gemv or args.backend == "cupy" else (151_936, 1_024),
        progress=None if args.json else lambda line: print(line, file=sys.stderr, flush=True),
    )
    report["command"] = "tinyqwen " + " ".join(sys.argv[1:])  # what reproduces this run
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_train(args) -> int:
    from tinyqwen.train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config)
    if args.out is not None:
        cfg.out_dir = args.out
    if args.steps is not None:
        cfg.steps = require_positive("--steps", args.steps)
    if args.no_progress:
        cfg.progress = False
    summary = train(cfg, resume=args.resume)
    print(
        f"trained {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {summary['wall_s']:.0f} s: "
        f"validation loss {summary['val_loss']:.3f} (unigram baseline {summary['unigram_val_loss']:.3f}); "
        f"checkpoint {summary['checkpoint']}, log {Path(cfg.out_dir) / 'log.jsonl'}"
    )
    return 0
