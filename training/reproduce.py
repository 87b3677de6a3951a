"""Reproduce chapter 13's stored training runs: one command, ~10 minutes on 2 cores.

    python training/reproduce.py            # from the repository root

Trains the same tiny Qwen3-MoE three times on the synthetic corpus (tinyqwen/corpus.py), with the load-balancing
loss coefficient 0 (off), 0.001 (Qwen3's router_aux_loss_coef) and 0.1 (large), each with `tinyqwen train
--config training/tiny-moe-aux<coef>.json`. It copies each run's log to notebooks/data/train-tiny-moe-aux<coef>.jsonl
(what the notebook plots) and writes notebooks/data/train-summary.json: per run the wall time, tokens seen,
validation loss vs the unigram baseline, and the expert-load figures the chapter quotes, plus greedy samples of the
coef-0.001 checkpoint through `tinyqwen generate`. Checkpoints stay in runs/ (not committed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "notebooks" / "data"
COEFS = ("0", "0.001", "0.1")
PROMPTS = ["417 + 88 =", "sort: pear fig apple ->", "the small cat", "def scale_4(x):\n"]


def load_figures(log: list[dict], last: int = 100) -> dict:
    """Expert-load statistics over the last `last` logged steps: share ×uniform per expert (1 = uniform)."""
    steps = [e for e in log if e.get("kind") == "step"]
    final_step = steps[-1]["step"]
    recent = [e for e in steps if e["step"] > final_step - last]
    load = np.mean([e["expert_load"] for e in recent], axis=0)  # [layers, E]
    ratio = load * load.shape[1]
    return {
        "window_steps": last,
        "share_x_uniform": ratio.round(3).tolist(),
        "min_x_uniform": float(ratio.min()),
        "max_x_uniform": float(ratio.max()),
        "experts_below_0.25x": int((ratio < 0.25).sum()),
        "coefficient_of_variation": float((load.std(axis=1) / load.mean(axis=1)).mean()),
    }


def main() -> int:
    DATA.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python training/reproduce.py", "runs": {}}
    t_all = time.perf_counter()
    for coef in COEFS:
        cfg = REPO / "training" / f"tiny-moe-aux{coef}.json"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "tinyqwen.cli", "train", "--config", str(cfg), "--no-progress"],
            cwd=REPO, check=True,
        )  # fmt: skip
        out = REPO / json.loads(cfg.read_text())["out_dir"]
        shutil.copy(out / "log.jsonl", DATA / f"train-tiny-moe-aux{coef}.jsonl")
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        run, final = log[0], log[-1]
        summary["runs"][coef] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "train_wall_s": round(final["wall_s"], 1),
            "train_cpu_s": round(final["cpu_s"], 1) if "cpu_s" in final else None,
            "tokens_seen": final["tokens_seen"],
            "parameters": run["parameters"],
            "val_loss": final["val_loss"],
            "unigram_val_loss": run["unigram_val_loss"],
            "peak_rss_mib": final["peak_rss_mib"],
            "expert_load": load_figures(log),
        }
        print(json.dumps({coef: summary["runs"][coef]}, indent=1), flush=True)
    checkpoint = REPO / "runs" / "tiny-moe-aux0.001" / "checkpoint"
    samples = []
    for prompt in PROMPTS:
        text = subprocess.run(
            [sys.executable, "-m", "tinyqwen.cli", "generate", "--model", str(checkpoint), "--raw",
             "--temperature", "0", "--max-new-tokens", "24", prompt],
            cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        samples.append({"prompt": prompt, "output": text})
    summary["samples_aux0.001"] = samples
    summary["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    (DATA / "train-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"done in {summary['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
