"""Chapter 14's experiment: how much quality a trained Qwen3-MoE keeps under bf16, Q8_0 and Q4_K, with and without
QK-Norm. One command, from the repository root:

    python training/quantization_experiment.py            # train both models (if runs/ lacks them), then measure
    python training/quantization_experiment.py --measure  # only measure the checkpoints already in runs/

Measured on a 2-core machine shared with much else (load average ~17): the two 800-step trainings took 14 and 21
minutes of wall time (about 100 CPU-seconds each when the machine is quiet, as in chapter 13), each measurement
2-13 minutes (under a CPU-minute).

The claims under test (from a survey among the project's sources): "INT8 keeps ~99 % of the quality, INT4 ~95 %",
and "QK-Norm makes Qwen3 stable under INT8/INT4 quantization". Random weights cannot test either: their values are
Gaussian, without the outliers training grows, and their next-token distributions are near-uniform. So this trains
chapter 13's tiny Qwen3-MoE twice (training/quant-qknorm.json is exactly chapter 13's coef-0.001 run;
training/quant-no-qknorm.json the same with the model config's tinyqwen-only key "qk_norm": false), then for each
quantizes every weight matrix — the embedding, attention, experts and head; the norms and the router stay float32,
as llama.cpp keeps them — and measures on the validation set:

  - val_loss: mean next-token cross-entropy (the trainer's windows, 64 × 16 × 8 tokens);
  - kl: mean KL(float32 model ‖ quantized model) per token, the field's quality measure (llama.cpp's perplexity
    tool has a --kl-divergence mode for it); top1: how often both pick the same next token;
  - accuracy: how often the model's top-1 equals the real next token; retention = accuracy / float32's accuracy
    (the closest thing to "quality retention" a benchmark score ratio measures);
  - learned_retention = (unigram loss − loss) / (unigram loss − float32 loss): the share of what training learned
    beyond token frequencies that survives quantization.

Q4_K needs rows of 256 values; this model's rows are 96 or 64 long. Each matrix is therefore quantized as one flat
run of values in super-blocks of 256 (a super-block may span 2-3 rows), which llama.cpp does not do (it would
choose another type for such a tensor). The error per value is Q4_K's either way: 8 sub-blocks of 32 with their
own 6-bit scale and min. Writes notebooks/data/quantization-experiment.json and
notebooks/data/trained-tensors.npz (a few of the trained matrices, for the chapter's error-vs-bits section).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tinyqwen.bf16 import bf16_to_float32, float32_to_bf16  # noqa: E402
from tinyqwen.corpus import build_dataset, unigram_loss  # noqa: E402
from tinyqwen.grad import loss_and_grads  # noqa: E402
from tinyqwen.model import MoEWeights  # noqa: E402
from tinyqwen.quantization import (  # noqa: E402
    dequantize_q4_k,
    dequantize_q8_0,
    quantize_q4_k,
    quantize_q8_0,
)
from tinyqwen.train import TrainConfig, load_checkpoint, sample_batch  # noqa: E402

RUNS = {"qk_norm": "training/quant-qknorm.json", "no_qk_norm": "training/quant-no-qknorm.json"}
OUT = REPO / "notebooks" / "data" / "quantization-experiment.json"
TENSORS = REPO / "notebooks" / "data" / "trained-tensors.npz"  # section 4's trained matrices
FORMATS = ("float32", "bf16", "q8_0", "q4_k")
BITS = {"float32": 32.0, "bf16": 16.0, "q8_0": 34 * 8 / 32, "q4_k": 144 * 8 / 256}  # bits per weight


def round_trip(w: np.ndarray, fmt: str) -> np.ndarray:
    """w as the quantized file would give it back: quantize, then dequantize (float32, same shape)."""
    if fmt == "float32":
        return w
    if fmt == "bf16":
        return bf16_to_float32(float32_to_bf16(w))
    flat = np.ascontiguousarray(w, np.float32).reshape(1, -1)  # see the docstring: one run of values
    if fmt == "q8_0":
        return dequantize_q8_0(quantize_q8_0(flat)).reshape(w.shape)
    return dequantize_q4_k(quantize_q4_k(flat)).reshape(w.shape)


def quantized_weights(w, fmt: str):
    """A copy of the model's weights with every matrix through `fmt` (norms and router untouched)."""
    q = lambda a: round_trip(a, fmt)  # noqa: E731
    layers = []
    for layer in w.layers:
        attn = dataclasses.replace(layer.attn, **{n: q(getattr(layer.attn, n))
                                                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")})  # fmt: skip
        mlp = layer.mlp
        if isinstance(mlp, MoEWeights):  # experts [E, out, in]: each expert's matrix on its own
            mlp = dataclasses.replace(mlp, **{n: np.stack([q(e) for e in getattr(mlp, n)])
                                              for n in ("gate_proj", "up_proj", "down_proj")})  # fmt: skip
        else:
            mlp = dataclasses.replace(
                mlp, **{n: q(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")}
            )
        layers.append(dataclasses.replace(layer, attn=attn, mlp=mlp))
    embed = q(w.embed)
    lm_head = embed if w.lm_head is w.embed else q(w.lm_head)
    return dataclasses.replace(w, embed=embed, layers=layers, lm_head=lm_head)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def measure(config_file: str) -> dict:
    cfg = TrainConfig.from_file(REPO / config_file)
    folder = REPO / cfg.out_dir
    c, raw, w, _, _ = load_checkpoint(folder / "checkpoint")
    data = build_dataset(cfg.docs, cfg.data_seed, c.vocab_size, cfg.val_fraction, folder / "tokenizer")
    baseline = unigram_loss(data["train"], data["val"], c.vocab_size)
    batches = [sample_batch(data["val"], cfg.batch_size, cfg.seq_len, cfg.seed + 10_000, b)
               for b in range(cfg.eval_batches)]  # fmt: skip
    results, ref_logp = {}, None
    for fmt in FORMATS:
        qw = quantized_weights(w, fmt)
        losses, logps = [], []
        for ids in batches:
            out = loss_and_grads(c, qw, ids, aux_coef=0.0, forward_only=True, keep_logits=True)
            losses.append(out.ce)
            logps.append(log_softmax(out.logits[:, :-1]))  # [B, T-1, V]: positions with a next token
        logp = np.concatenate(logps)
        targets = np.concatenate([ids[:, 1:] for ids in batches])
        if ref_logp is None:
            ref_logp = logp
        kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(-1)
        results[fmt] = {
            "bits_per_weight": BITS[fmt],
            "val_loss": float(np.mean(losses)),
            "kl": float(kl.mean()),
            "kl_p99": float(np.quantile(kl, 0.99)),
            "top1_agreement": float((logp.argmax(-1) == ref_logp.argmax(-1)).mean()),
            "accuracy": float((logp.argmax(-1) == targets).mean()),
        }
    f32 = results["float32"]
    for r in results.values():
        r["retention"] = r["accuracy"] / f32["accuracy"]
        r["learned_retention"] = (baseline - r["val_loss"]) / (baseline - f32["val_loss"])
    return {"config": config_file, "qk_norm": c.qk_norm, "unigram_val_loss": baseline,
            "tokens": int(targets.size), "formats": results, "weight_stats": weight_stats(w)}  # fmt: skip


def weight_stats(w) -> dict:
    """How heavy the tails are: per matrix kind, max |w| / std and the kurtosis (3 for a Gaussian)."""
    kinds = {"embed": [w.embed], "q_proj": [], "k_proj": [], "o_proj": [], "experts.down_proj": []}
    for layer in w.layers:
        for n in ("q_proj", "k_proj", "o_proj"):
            kinds[n].append(getattr(layer.attn, n))
        if isinstance(layer.mlp, MoEWeights):
            kinds["experts.down_proj"].append(layer.mlp.down_proj)
    out = {}
    for kind, arrays in kinds.items():
        v = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
        z = (v - v.mean()) / v.std()
        out[kind] = {"max_over_std": float(np.abs(z).max()), "kurtosis": float((z**4).mean())}
    return out


def save_trained_tensors(config_file: str) -> None:
    """A few matrices of the trained model for the chapter's error-vs-bits section: layer 0's q_proj (a typical
    one), the layer matrix with the heaviest tails (largest max |w| / std), and the embedding."""
    c, _, w, _, _ = load_checkpoint(REPO / TrainConfig.from_file(REPO / config_file).out_dir / "checkpoint")
    found = {}
    for i, layer in enumerate(w.layers):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            found[f"layers.{i}.self_attn.{n}"] = getattr(layer.attn, n)
        if isinstance(layer.mlp, MoEWeights):
            for n in ("gate_proj", "up_proj", "down_proj"):
                for e, a in enumerate(getattr(layer.mlp, n)):
                    found[f"layers.{i}.mlp.experts.{e}.{n}"] = a
    tail = {k: float(np.abs(a - a.mean()).max() / a.std()) for k, a in found.items()}
    keep = ["layers.0.self_attn.q_proj", *sorted(tail, key=tail.get, reverse=True)[:1], "embed_tokens"]
    found["embed_tokens"] = w.embed  # the heaviest tails of all (llama.cpp's Q4_K_M gives it Q6_K)
    np.savez_compressed(TENSORS, **{k: np.asarray(found[k], np.float32) for k in dict.fromkeys(keep)})


def main() -> None:
    measure_only = "--measure" in sys.argv[1:]
    t0 = time.perf_counter()
    for config_file in RUNS.values():
        folder = REPO / TrainConfig.from_file(REPO / config_file).out_dir
        if not (folder / "checkpoint" / "model.safetensors").is_file():
            if measure_only:
                raise SystemExit(f"{folder} has no checkpoint: run without --measure to train it")
            subprocess.run([sys.executable, "-m", "tinyqwen.cli", "train", "--config", config_file],
                           cwd=REPO, check=True)  # fmt: skip
    save_trained_tensors(RUNS["qk_norm"])
    runs = {name: measure(config_file) for name, config_file in RUNS.items()}
    summary = {"command": "python training/quantization_experiment.py", "runs": runs,
               "measure_wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    OUT.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for name, r in runs.items():
        for fmt, m in r["formats"].items():
            print(
                f"{name:>10} {fmt:>7}: val loss {m['val_loss']:.4f}  KL {m['kl']:.2e}  top-1 {m['top1_agreement']:.3f}"
                f"  accuracy {m['accuracy']:.3f} (×{m['retention']:.3f})  learned {m['learned_retention']:.3f}"
            )
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
