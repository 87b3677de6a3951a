"""BPE training time: the incremental trainer (tinyqwen.corpus.train_bpe) against the naive one, in one run.

    python benchmarks/bench_bpe_training.py [--input FILE] [--vocab-size 500] [--repeats 3] [--json]
    python benchmarks/bench_bpe_training.py --make-corpus     # rewrite benchmarks/data/english-like.txt

The task is the size of CS336 assignment 1's `test_train_bpe_speed` (a ~130 kB English corpus, vocab 500, one
special token, a 1.5 s limit). That corpus is not shipped here, so the default input is a ~130 kB English-like
text made by a seeded generator (`make_corpus`, committed as benchmarks/data/english-like.txt): common English
words plus ~12,000 made-up words drawn with Zipf frequencies, sentences with commas, numbers and capitals, and
`<|endoftext|>` between documents. `--input` takes any UTF-8 file (CS336's corpus.en if you have it).

Engines, each on the same text, best of `--repeats`:
  tinyqwen-incremental   corpus.train_bpe: pair counts updated only in the words a merge touches, a lazy heap
  exercise-solution      chapter 1's solution (exercises/solutions/ch01_tokenization.py, train_bpe)
  naive                  recount every pair of every word after each merge (the textbook loop, as in the test)
All three must return the same merges; the script checks that and prints the times and ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exercises.solutions import ch01_tokenization as solution  # noqa: E402
from tinyqwen import corpus  # noqa: E402

CORPUS = REPO / "benchmarks" / "data" / "english-like.txt"
SPECIAL = "<|endoftext|>"

COMMON = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two has "
    "look more day could go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want air well also "
    "play small end put home read hand port large spell add even land here must big high such follow act why ask"
).split()
ONSETS = "b c d f g h j k l m n p r s t v w y z br cr dr fr gr pr tr bl cl fl gl pl sl st sp sc sh ch th wh qu".split()
NUCLEI = "a e i o u a e i o u ea ee oo ai ou ie".split()
CODAS = [""] * 12 + "n r s t l m d ng st nd rt ck sh th ll ss".split()
SUFFIXES = [""] * 20 + "s s ed ing er ly tion ness ment al".split()
SYLLABLES = [1] * 10 + [2] * 7 + [3] * 3  # made-up words of about 5 letters, as English's average


def make_corpus(n_chars: int = 130_000, seed: int = 0) -> str:
    """The English-like benchmark text, deterministic: only `random.Random.random()` (stable across Pythons)."""
    import random

    rng = random.Random(seed)

    def pick(items):
        return items[int(rng.random() * len(items))]

    words: list[str] = []
    seen = set(COMMON)
    while len(words) < 12_000:
        w = "".join(pick(ONSETS) + pick(NUCLEI) + pick(CODAS) for _ in range(pick(SYLLABLES)))
        w += pick(SUFFIXES)
        if w not in seen:
            seen.add(w)
            words.append(w)
    # Zipf: the word of rank r is drawn with weight 1 / (r + 2); cumulative weights for a binary search
    from bisect import bisect
    from itertools import accumulate

    cum = list(accumulate(1.0 / (r + 2) for r in range(len(words))))

    def content_word() -> str:
        return words[min(bisect(cum, rng.random() * cum[-1]), len(words) - 1)]

    def token() -> str:
        u = rng.random()
        if u < 0.45:
            return pick(COMMON)
        if u < 0.47:
            return (
                str(int(rng.random() * 3000))
                if rng.random() < 0.7
                else f"{int(rng.random() * 90) + 10},{int(rng.random() * 900) + 100}"
            )
        if u < 0.52:
            return content_word().capitalize()
        return content_word()

    docs, size = [], 0
    while size < n_chars:
        lines = []
        for _ in range(3 + int(rng.random() * 10)):
            sentence = [token() for _ in range(6 + int(rng.random() * 18))]
            for at in sorted(
                {2 + int(rng.random() * (len(sentence) - 3)) for _ in range(int(rng.random() * 3))}
            )[::-1]:
                sentence.insert(at, ",")
            sentence[0] = sentence[0].capitalize()
            lines.append(" ".join(sentence) + pick([" .", " .", " .", " ?", " !", "."]))
        doc = "\n".join(lines) + "\n"
        docs.append(doc)
        size += len(doc) + len(SPECIAL)
    return SPECIAL.join(docs)


def naive_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Recount every pair after each merge; ties to the pair that sorts first (the library's rule)."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges.append(best)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=CORPUS)
    ap.add_argument("--vocab-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-naive", action="store_true", help="the naive trainer takes ~10 s or more")
    ap.add_argument("--make-corpus", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.make_corpus:
        CORPUS.parent.mkdir(parents=True, exist_ok=True)
        CORPUS.write_text(make_corpus(), encoding="utf-8")
        print(f"wrote {CORPUS.relative_to(REPO)} ({CORPUS.stat().st_size:,} bytes)")
        return 0
    text = args.input.read_text(encoding="utf-8")
    n_merges = args.vocab_size - 256 - 1  # the special token takes one id of the vocabulary, as in CS336

    def library():
        return corpus.train_bpe([text], args.vocab_size - 1, (SPECIAL,))[1]

    def exercise():
        return solution.train_bpe(text, args.vocab_size, [SPECIAL])

    def naive():
        return naive_merges(corpus.word_counts([text], (SPECIAL,)), n_merges)

    engines = {"tinyqwen-incremental": library, "exercise-solution": exercise}
    if not args.skip_naive:
        engines["naive"] = naive
    results, merges = {}, {}
    for name, fn in engines.items():
        times = []
        for _ in range(args.repeats if name != "naive" else 1):
            t0 = time.perf_counter()
            merges[name] = fn()
            times.append(time.perf_counter() - t0)
        results[name] = {"best_s": round(min(times), 3), "runs_s": [round(t, 3) for t in times]}
    same = all(m == merges["tinyqwen-incremental"] for m in merges.values())
    base = results["tinyqwen-incremental"]["best_s"]
    report = {
        "input": str(args.input.relative_to(REPO) if args.input.is_relative_to(REPO) else args.input.name),
        "input_bytes": len(text.encode("utf-8")),
        "vocab_size": args.vocab_size,
        "merges": len(merges["tinyqwen-incremental"]),
        "same_merges": same,
        "results": results,
        "ratios_vs_incremental": {k: round(v["best_s"] / base, 2) for k, v in results.items()},
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['input']}: {report['input_bytes']:,} bytes, vocab {args.vocab_size} "
              f"({report['merges']} merges + 256 bytes + 1 special), same merges: {same}")  # fmt: skip
        for name, r in results.items():
            print(
                f"  {name:22s} {r['best_s']:7.3f} s   ({report['ratios_vs_incremental'][name]:.2f}× incremental)"
            )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
