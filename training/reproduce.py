"""Reproduce chapter 13's stored training runs: one command (measured: 60 min of wall time on a shared 2-core
machine at low priority, 19.5 CPU-minutes — about 100 CPU-seconds per 800-step run).

    python training/reproduce.py                  # from the repository root: every run in RUNS, one after another
    python training/reproduce.py layer-aux0.001   # only the named runs (the summary keeps the others' entries)
    python training/reproduce.py --jobs 2         # two runs at a time (same logs; each run's times then overlap)

Trains the same tiny Qwen3-MoE (4 layers × 8 experts, top-2) on the synthetic corpus (tinyqwen/corpus.py) with
`tinyqwen train --config training/tiny-moe-<name>.json` for each run in RUNS: the load-balancing coefficient 0
(off), 0.001 (Qwen3's router_aux_loss_coef) and 0.1 with transformers' aux loss (scope "global": every layer's
router rows pooled), and 0.001, 0.003, 0.01 and 0.1 with the per-layer loss (scope "layer", averaged over layers), 800
steps each; then coefficient 0 and layer-scope 0.001 again for 1600 steps ("long-", the same schedule stretched),
to see whether the trends seen at 800 steps continue.
It copies each run's log to notebooks/data/train-tiny-moe-<name>.jsonl (what the notebook plots) and writes
notebooks/data/train-summary.json: per run the wall time, tokens seen, validation loss vs the unigram baseline and
the expert-load figures the chapter quotes, plus greedy samples of the coef-0.001 checkpoint through
`tinyqwen generate`. Checkpoints stay in runs/ (not committed).

Expert-load figures (`load_figures`), over the last WINDOW steps, as share × uniform (1 = each expert gets 1/E of
the (token, slot) routing picks):
  - per layer: each MoE layer's own shares — what routing capacity and specialisation depend on;
  - pooled: expert e's picks summed over all layers — the only thing transformers' ("global") aux loss sees.
The criteria, fixed before the runs: a layer is *collapsed* when one of its experts gets under 0.25× uniform
("starved"); a run is *within the band* when every share lies in [0.5, 1.5]× uniform.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "notebooks" / "data"
RUNS = (
    "aux0",
    "aux0.001",
    "aux0.1",
    "layer-aux0.001",
    "layer-aux0.003",
    "layer-aux0.01",
    "layer-aux0.1",
    "long-aux0",
    "long-layer-aux0.001",
)
SAMPLE_RUN = "aux0.001"
PROMPTS = ["417 + 88 =", "sort: pear fig apple ->", "the small cat", "def scale_4(x):\n"]
WINDOW, STARVED, BAND = 100, 0.25, (0.5, 1.5)


def shares(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer [L, E] and pooled [E] share × uniform, averaged over log entries (each holds per-layer shares of
    the same number of picks, so pooling over layers is the mean of the layers' shares)."""
    load = np.mean([e["expert_load"] for e in entries], axis=0)  # [L, E], rows sum to 1
    E = load.shape[1]
    return load * E, load.mean(axis=0) * E


def _stats(ratio: np.ndarray) -> dict:
    return {
        "min": round(float(ratio.min()), 3),
        "max": round(float(ratio.max()), 3),
        "starved": int((ratio < STARVED).sum()),
        "within_band": bool(((ratio >= BAND[0]) & (ratio <= BAND[1])).all()),
        "cv": round(
            float((ratio.std(axis=-1) / ratio.mean(axis=-1)).mean()), 3
        ),  # mean over layers if [L, E]
    }


def load_figures(log: list[dict]) -> dict:
    """Expert-load figures over the last WINDOW steps, and the per-layer trend per WINDOW-step block."""
    steps = [e for e in log if e.get("kind") == "step"]
    final = steps[-1]["step"]
    per_layer, pooled = shares([e for e in steps if e["step"] > final - WINDOW])
    trend = []
    for end in range(WINDOW, final + 1, WINDOW):
        block, _ = shares([e for e in steps if end - WINDOW < e["step"] <= end])
        trend.append({"step": end, "min": round(float(block.min()), 3), "max": round(float(block.max()), 3),
                      "starved": int((block < STARVED).sum())})  # fmt: skip
    return {
        "window_steps": WINDOW,
        "per_layer_x_uniform": per_layer.round(3).tolist(),
        "pooled_x_uniform": pooled.round(3).tolist(),
        "per_layer": _stats(per_layer),
        "pooled": _stats(pooled),
        "trend_per_layer": trend,
    }


def _train(name: str) -> float:
    """Run one config in its own process; returns its wall time (it includes building the corpus)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", "train", "--config", str(REPO / "training" / f"tiny-moe-{name}.json"),
         "--no-progress"],
        cwd=REPO, check=True,
    )  # fmt: skip
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    jobs = 1
    if argv[:1] == ["--jobs"] and len(argv) > 1 and argv[1].isdigit() and int(argv[1]) > 0:
        jobs, argv = int(argv[1]), argv[2:]
    names = argv or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        print(f"unknown run {unknown[0]!r} (runs: {', '.join(RUNS)})", file=sys.stderr)
        return 1
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / "train-summary.json"
    summary = json.loads(path.read_text()) if path.is_file() and argv else {"runs": {}}
    summary["command"] = "python training/reproduce.py"
    summary["criteria"] = {"window_steps": WINDOW, "starved_below_x_uniform": STARVED, "band_x_uniform": BAND}
    t_all = time.perf_counter()
    # each run is its own process, deterministic on its own: running several at once changes only the times
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        walls = dict(zip(names, pool.map(_train, names), strict=True))
    for name in names:
        cfg = REPO / "training" / f"tiny-moe-{name}.json"
        out = REPO / json.loads(cfg.read_text())["out_dir"]
        shutil.copy(out / "log.jsonl", DATA / f"train-tiny-moe-{name}.jsonl")
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        run, final = log[0], log[-1]
        summary["runs"][name] = {
            "aux_coef": run["aux_coef"],
            "aux_loss_scope": run.get("aux_loss_scope", "global"),
            "wall_s": round(walls[name], 1),
            "train_wall_s": round(final["wall_s"], 1),
            "train_cpu_s": round(final["cpu_s"], 1),
            "steps": final["steps"],
            "tokens_seen": final["tokens_seen"],
            "parameters": run["parameters"],
            "val_loss": final["val_loss"],
            "unigram_val_loss": run["unigram_val_loss"],
            "peak_rss_mib": final["peak_rss_mib"],
            "expert_load": load_figures(log),
        }
        print(json.dumps({name: summary["runs"][name]}, indent=1), flush=True)
    if SAMPLE_RUN in names:
        checkpoint = REPO / "runs" / f"tiny-moe-{SAMPLE_RUN}" / "checkpoint"
        samples = []
        for prompt in PROMPTS:
            text = subprocess.run(
                [sys.executable, "-m", "tinyqwen.cli", "generate", "--model", str(checkpoint), "--raw",
                 "--temperature", "0", "--max-new-tokens", "24", prompt],
                cwd=REPO, check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            samples.append({"prompt": prompt, "output": text})
        summary["samples_aux0.001"] = samples
    summary["runs"] = {k: summary["runs"][k] for k in RUNS if k in summary["runs"]}
    # the one-command time: every run's wall time (each includes building its corpus) plus the samples
    summary["total_wall_s"] = round(sum(r["wall_s"] for r in summary["runs"].values()), 1)
    summary["total_cpu_s"] = round(sum(r["train_cpu_s"] for r in summary["runs"].values()), 1)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
