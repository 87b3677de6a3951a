"""The full same-run comparison on a random checkpoint with the exact Qwen3-0.6B config.

    ../shared/peers/setup        # once per machine (~15 min): a venv (torch, transformers, llama-cpp-python),
                                 # PEER_DIR/qwen3-0.6b-random (bf16) and its GGUFs (bf16, q8_0)
    TINYQWEN_PEER_DIR=PEER_DIR TINYQWEN_PEER_PYTHON=VENV/bin/python python benchmarks/bench_model.py [--save run.json]

The same as `tinyqwen bench --model PEER_DIR/qwen3-0.6b-random --peer-python VENV/bin/python`, with the defaults
of this setup (--model and --peer-python override the two variables):
tinyqwen numpy and numba, transformers fp32 and bf16, llama.cpp on every GGUF beside the checkpoint, 2 threads,
512-token prompt, 128 new tokens, best of 2, plus the GEMV bandwidth probe; each engine in its own process
(tinyqwen/bench/engines/driver.py has the one timing loop). Host timings swing 30-50% between runs: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tinyqwen.bench import ENGINE_KINDS, format_report, run_benchmark

PEER_DIR = os.environ.get("TINYQWEN_PEER_DIR")  # the peers' folder (../shared/peers/setup writes it)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=PEER_DIR and os.path.join(PEER_DIR, "qwen3-0.6b-random"),
        help="checkpoint (default: $TINYQWEN_PEER_DIR/qwen3-0.6b-random)",
    )
    parser.add_argument("--engines", default=",".join(ENGINE_KINDS))
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("TINYQWEN_PEER_PYTHON", sys.executable),
        help="a python with torch, transformers and llama-cpp-python (default: $TINYQWEN_PEER_PYTHON, else this one)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, help="also write the run's JSON here")
    args = parser.parse_args()
    if not args.model:
        parser.error("no model: pass --model or set TINYQWEN_PEER_DIR (the folder holding qwen3-0.6b-random)")

    report = run_benchmark(
        args.model,
        args.engines.split(","),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        threads=args.threads,
        peer_python=args.peer_python if Path(args.peer_python).exists() else None,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.save:
        args.save.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))


if __name__ == "__main__":
    main()
