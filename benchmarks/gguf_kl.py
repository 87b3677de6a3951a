"""Quantized-model quality against llama.cpp: KL divergence and top-1 agreement, every position, same file and prompt.

    python benchmarks/gguf_kl.py PEER_DIR [--positions 64] [--json]

PEER_DIR holds the random-weight Qwen3-0.6B checkpoint (`qwen3-0.6b-random/`) and llama.cpp's conversions of it
(`qwen3-0.6b-random-{bf16,q8_0,q4_k_m}.gguf`; see the benchmarks' README for the script that makes them). Needs a
python with llama-cpp-python (the peers' venv) besides tinyqwen's own dependencies.

For each GGUF file, on the same `--positions` random prompt ids (seed 0):

* llama.cpp's logits for every position (llama-cpp-python, `logits_all=True`);
* tinyqwen's numpy backend on the same file: the blocks widened exactly (`QuantizedTensor.dequantize`, bit-identical
  to llama.cpp's `gguf` package), float32 arithmetic;
* tinyqwen on the unquantized bf16 checkpoint.

and prints the mean KL(p || q) over positions (nats) and the fraction of positions whose argmax agrees, for: llama.cpp
vs tinyqwen on the same file; tinyqwen's quantized model vs tinyqwen's bf16 model; llama.cpp's quantized file vs
tinyqwen's bf16 model. llama.cpp quantizes the activations to 8 bits in its dot products (and sums in its own order),
so the first pair is not zero; it stays far below the quantization's own effect (the second pair). Random weights
give near-tied logits: top-1 is a weak measure there, KL the one to read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def log_softmax(z: np.ndarray) -> np.ndarray:  # [T, V] -> [T, V] float64
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_top1(p_logits: np.ndarray, q_logits: np.ndarray) -> tuple[float, float]:
    """Mean over positions of KL(p || q) in nats, and the fraction of positions with the same argmax."""
    p, q = log_softmax(p_logits), log_softmax(q_logits)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return kl, float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean())


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:  # -> [T, V] float32
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=2
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], np.float32)
    llm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("peer_dir", type=Path)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import tinyqwen

    ids = np.random.default_rng(0).integers(0, 151_643, args.positions).tolist()
    bf16_model = tinyqwen.load_model(args.peer_dir / "qwen3-0.6b-random")
    ours_bf16 = bf16_model(ids)
    del bf16_model
    rows = []
    for kind in ("bf16", "q8_0", "q4_k_m"):
        path = args.peer_dir / f"qwen3-0.6b-random-{kind}.gguf"
        theirs = llama_cpp_logits(path, ids)
        ours = tinyqwen.load_model(path)(ids)
        for pair, (p, q) in {
            "llama.cpp vs tinyqwen, same file": (theirs, ours),
            "tinyqwen file vs tinyqwen bf16": (ours_bf16, ours),
            "llama.cpp file vs tinyqwen bf16": (ours_bf16, theirs),
        }.items():
            kl, top1 = kl_top1(p, q)
            rows.append({"file": kind, "pair": pair, "kl": kl, "top1": top1, "positions": len(ids)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'file':8s} {'pair':36s} {'mean KL':>10s} {'top-1':>6s}")
    for r in rows:
        print(f"{r['file']:8s} {r['pair']:36s} {r['kl']:10.2e} {r['top1']:6.2f}")


if __name__ == "__main__":
    main()
