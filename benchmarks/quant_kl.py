"""How close the numba backend's quantized paths land to llama.cpp on the same GGUF file: mean KL and top-1, every
position of one random prompt.

    python benchmarks/quant_kl.py MODEL.gguf [...] --peer-python PY [--positions 64]

For each file, llama.cpp's logits for every position (llama-cpp-python, logits_all) against tinyqwen's numba
backend three ways: decode with the "int8" GEMVs (one token at a time through the KV cache: every product quantizes
its activations to int8 blocks, as llama.cpp's CPU kernels do), decode with the "float" GEMVs (the blocks widened in
registers, float32 activations), and prefill, all positions at once, both ways ("int8": the same activation
rounding in quant_matmul.py's tiles; "float": blocks dequantized into BLAS, float32). The int8 paths make the
choices llama.cpp makes, so they should land closest to it; KL is the measure to read (random weights give
near-tied logits, so top-1 is a weak one).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

LLAMA = r"""
import sys, numpy as np
from llama_cpp import Llama
path, out, T = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=T + 8, n_threads=2, n_batch=512, logits_all=True, verbose=False)
ids = [int(i) for i in np.random.default_rng(0).integers(0, min(llm.n_vocab(), 151643), T)]
llm.eval(ids)
np.save(out, np.array(llm.scores[:T], np.float32))
"""


def log_softmax(z: np.ndarray) -> np.ndarray:  # [T, V] -> [T, V] float64
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_top1(
    p_logits: np.ndarray, q_logits: np.ndarray
) -> tuple[float, float]:  # mean KL(p || q), top-1 agree
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return float(kl.mean()), float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean())


def ours(path: Path, positions: int) -> dict[str, np.ndarray]:  # name -> [T, V] logits
    import tinyqwen
    from tinyqwen.backends.numba import backend

    model = tinyqwen.load_model(path, backend="numba")
    vocab = min(model.config.vocab_size, 151643)
    ids = np.random.default_rng(0).integers(0, vocab, positions)[None]  # the same ids as llama.cpp's
    out = {}
    for mode in ("int8", "float"):  # all positions at once: int8 tiles, or blocks widened into BLAS
        model.backend = backend(quant_gemv=mode)
        out[f"numba prefill {mode}"] = model(ids)[0]
    for mode in ("int8", "float"):
        model.backend = backend(quant_gemv=mode)
        cache = model.new_cache(1, positions)
        steps = [model.forward(ids[:, t : t + 1], cache=cache).logits[0, 0] for t in range(positions)]
        out[f"numba decode {mode}"] = np.stack(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--peer-python", required=True, help="a python with llama-cpp-python")
    parser.add_argument("--positions", type=int, default=64)
    args = parser.parse_args()
    print(f"{args.positions} positions, KL(llama.cpp || tinyqwen) in nats, top-1 agreement")
    for path in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "llama.npy"
            cmd = [args.peer_python, "-c", LLAMA, str(path), str(out), str(args.positions)]
            subprocess.run(cmd, check=True)
            ref = np.load(out)
        for name, logits in ours(path, args.positions).items():
            kl, top1 = kl_top1(ref, logits)
            print(f"{path.name:<32} {name:<22} KL {kl:9.2e}  top-1 {top1:5.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
