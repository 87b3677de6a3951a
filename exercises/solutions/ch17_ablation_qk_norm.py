"""Capstone of part V, solved: the QK-Norm ablation (the exercise's text, then the two functions written out).

Does QK-Norm earn its place?

Qwen3 normalises every query and key head (QK-Norm, chapter 5 §7) before the dot product; Qwen2 did not. Find out
what it buys by training the same tiny dense Qwen3 with and without it, at several learning rates, from the same
initial weights on the same batches — one switch changed, everything else equal. That is an ablation.

You write the training loop (`train_run`) and the experiment (`ablation`) from chapter 13's pieces:
`tinyqwen.train.init_weights`, `tinyqwen.grad.loss_and_grads`, `tinyqwen.grad.named_parameters`, `tinyqwen.train.clip_gradients`, `tinyqwen.train.AdamW`. The switch is the config's `qk_norm` field (a tinyqwen
extra, True in every official config): `dataclasses.replace(CONFIG, qk_norm=False)` is the same model without
QK-Norm, for the trainer and the inference model alike. The model, the data and the batches are given below, so
that your numbers can be compared with ours. Grade with

    pytest exercises/test_ch17_ablation_qk_norm.py

Then run the whole experiment and plot it (4 learning rates × 2 settings × 100 steps: one to two minutes):

    python exercises/ch17_ablation_qk_norm.py          # writes ablation_qk_norm.png

and compare your picture with the stored run (exercises/references/ch17_ablation_qk_norm.json). What would you
conclude, and what would you need to run before believing it at a larger scale?
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tinyqwen.config import Qwen3Config, config_from_dict

# A tiny dense Qwen3 over bytes (vocabulary 256): 2 layers, hidden 64, 4 query / 2 kv heads of 16, MLP 128.
CONFIG: Qwen3Config = config_from_dict({
    "model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
})  # fmt: skip
BATCH, SEQ = 8, 32  # each step: 8 windows of 32 bytes
SEED = 0  # the initial weights: init_weights(CONFIG, SEED)
# AdamW and clipping as chapter 13's trainer: betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clip the global
# gradient norm to 1.0; a CONSTANT learning rate (no warm-up, no decay: the schedule is not what we study)
BETAS, ADAM_EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0
LRS = (3e-3, 1e-2, 3e-2, 1e-1)  # the learning rates of the full experiment
STEPS = 100


def make_data(n_bytes: int = 200_000, seed: int = 0) -> np.ndarray:  # -> [n_bytes] int64 token ids (bytes)
    """A synthetic byte corpus: additions ("417+88=505") and sentences from a 12-word vocabulary, one per line."""
    g = np.random.default_rng(seed)
    words = "the a cat dog sat ran on under big small red old".split()
    lines, size = [], 0
    while size < n_bytes:
        if g.random() < 0.5:
            a, b = g.integers(0, 1000, 2)
            lines.append(f"{a}+{b}={a + b}\n")
        else:
            lines.append(" ".join(g.choice(words, g.integers(3, 8))) + ".\n")
        size += len(lines[-1])
    return np.frombuffer("".join(lines).encode()[:n_bytes], dtype=np.uint8).astype(np.int64)


DATA = make_data()


def batch(
    step: int,
) -> np.ndarray:  # -> [BATCH, SEQ] ids: the batch of step `step` (1, 2, ...), same for every run
    starts = np.random.default_rng((SEED, step)).integers(0, len(DATA) - SEQ + 1, BATCH)
    return np.stack([DATA[s : s + SEQ] for s in starts])


def train_run(lr: float, steps: int, qk_norm: bool) -> list[float]:
    """Train a fresh model (init_weights(CONFIG, SEED)) for `steps` steps on batch(1), batch(2), ...; return the
    training cross-entropy of every step, measured before that step's update.  -> [steps] floats

    Each step: loss and gradients of the batch, clip the global norm to GRAD_CLIP, one AdamW update at `lr`.
    `qk_norm=False`: train dataclasses.replace(CONFIG, qk_norm=False) instead (the same initial weights).
    """
    from tinyqwen.grad import loss_and_grads, named_parameters
    from tinyqwen.train import AdamW, clip_gradients, init_weights

    config = CONFIG if qk_norm else dataclasses.replace(CONFIG, qk_norm=False)  # the one switch
    weights = init_weights(CONFIG, SEED)  # the same start for every run: only the switch differs
    params = named_parameters(weights)  # views: AdamW updates the model's own arrays
    opt = AdamW(BETAS, ADAM_EPS, WEIGHT_DECAY)
    losses = []
    for step in range(1, steps + 1):
        result = loss_and_grads(config, weights, batch(step))
        grads = named_parameters(result.grads)
        clip_gradients(grads, GRAD_CLIP)
        opt.update(params, grads, lr)
        losses.append(result.ce)  # measured before this step's update
    return losses


def final_loss(losses: list[float]) -> float:
    """What a run ended at: the mean of its last 10 training losses (all of them if there are fewer)."""
    return float(np.mean(losses[-10:]))


def ablation(lrs: tuple[float, ...], steps: int) -> dict[str, list[float]]:
    """The experiment: {"qk_norm": [final_loss of each lr's run], "no_qk_norm": [the same without QK-Norm]}."""
    return {
        "qk_norm": [final_loss(train_run(lr, steps, qk_norm=True)) for lr in lrs],
        "no_qk_norm": [final_loss(train_run(lr, steps, qk_norm=False)) for lr in lrs],
    }


def plot(result: dict[str, list[float]], lrs: tuple[float, ...], path: str = "ablation_qk_norm.png") -> None:
    """Final training loss against the learning rate, with and without QK-Norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for key, label in (("qk_norm", "with QK-Norm (Qwen3)"), ("no_qk_norm", "without QK-Norm")):
        ax.plot(lrs, result[key], "o-", label=label)
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"final training loss ({STEPS} steps)")
    ax.legend()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    from tinyqwen.train import limit_blas_threads

    limit_blas_threads(1)  # one BLAS thread: the runs are reproducible to the last bit on one machine
    result = ablation(LRS, STEPS)
    for i, lr in enumerate(LRS):
        print(f"lr {lr:g}: with QK-Norm {result['qk_norm'][i]:.3f}, without {result['no_qk_norm'][i]:.3f}")
    plot(result, LRS)
