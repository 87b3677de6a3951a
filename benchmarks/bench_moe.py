"""MoE benchmark: a random, scaled-down Qwen3-30B-A3B, numpy vs numba, in one run.

    python benchmarks/bench_moe.py [--out /tmp/qwen3-30b-a3b-2layers-random] [--layers 2] [--json]

The checkpoint has Qwen3-30B-A3B's exact config.json (tinyqwen/data/configs/Qwen3-30B-A3B.json: 128 experts,
top-8, hidden 2048, expert ffn 768, 32 query / 4 kv heads, vocab 151,936, untied) except for the number of layers:
2 by default, i.e. 1.87 B parameters, 3.7 GB in bf16 (the numpy backend widens them to 7.5 GB of fp32; each extra
layer adds 0.62 B parameters, 1.25 GB of bf16). The weights are random (normal, std 0.02; norms 1), written as BF16 safetensors shards
to --out (under /tmp: never commit it) on the first run and reused after.

It then times the two tinyqwen backends with `tinyqwen.bench.run_benchmark` (the same child processes and timing
loop as `tinyqwen bench`), with the GEMV bandwidth probe, and prints the table (or the JSON). The decode bytes per
token count only the 8 routed experts of each layer, plus attention, router and the lm_head: 425 M weights with
2 layers, 311 M of them the lm_head, so `decode GB/s` says more than the tok/s ratio about the MoE kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tinyqwen" / "data" / "configs" / "Qwen3-30B-A3B.json"
SHARD_BYTES = 1 << 30  # fp32 bytes generated per shard before it is written as bf16 (512 MB on disk)


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    """Random BF16 weights for Qwen3-30B-A3B's config with `layers` layers, as sharded safetensors + index."""
    from tinyqwen.config import config_from_dict, expected_tensors
    from tinyqwen.safetensors import save_file

    config = json.loads(CONFIG.read_text())
    config.update(num_hidden_layers=layers, max_window_layers=layers)
    shapes = expected_tensors(config_from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():  # group tensors into shards of about SHARD_BYTES of fp32
        nbytes = 4 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shapes[name], dtype=np.float32)
            else:
                tensors[name] = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(0.02)
        save_file(tensors, out / file, metadata={"format": "pt"}, bf16=True)
        weight_map.update(dict.fromkeys(names, file))
        print(f"  wrote {file} ({len(names)} tensors)", file=sys.stderr, flush=True)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(
        json.dumps(config, indent=2)
    )  # written last: marks the checkpoint complete
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, help="checkpoint directory (default /tmp/qwen3-30b-a3b-<N>layers-random)"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the run as one JSON object")
    args = parser.parse_args()

    from tinyqwen.bench import format_report, run_benchmark

    out = args.out or Path(f"/tmp/qwen3-30b-a3b-{args.layers}layers-random")
    if not (out / "config.json").is_file():
        print(
            f"writing a random {args.layers}-layer Qwen3-30B-A3B-shaped checkpoint to {out}", file=sys.stderr
        )
        write_checkpoint(out, args.layers)
    report = run_benchmark(
        out,
        ["numpy", "numba"],
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        threads=args.threads,
        progress=None if args.json else lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))


if __name__ == "__main__":
    main()
