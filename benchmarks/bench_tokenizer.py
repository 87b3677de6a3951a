"""Encode throughput of tinyqwen's tokenizer against Hugging Face `tokenizers` on the same text, in one run.

    python benchmarks/bench_tokenizer.py [--mb 1.1] [--repeats 3]

Text: the deterministic mixed corpus of tests/tokenizer_corpus.py (half Python stdlib code, half random text in
many scripts with emoji, whitespace runs, numbers and added tokens), encoded document by document. Both sides run
single-threaded (`tokenizers` through `encode`, with RAYON_NUM_THREADS=1) and start every pass with an empty
cache; "warm" is a second pass over the same text. Needs the dev dependency `tokenizers` and the official
tokenizer.json ($TINYQWEN_SHARED/qwen3-tokenizer or ../shared/qwen3-tokenizer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported: its thread pool reads it once
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tokenizer_corpus import mixed_documents  # noqa: E402

from tinyqwen.tokenizer import Tokenizer  # noqa: E402


def find_tokenizer_json() -> Path:
    roots = [Path(os.environ["TINYQWEN_SHARED"])] if os.environ.get("TINYQWEN_SHARED") else []
    roots.append(REPO.parent / "shared")
    for root in roots:
        if (root / "qwen3-tokenizer" / "tokenizer.json").is_file():
            return root / "qwen3-tokenizer" / "tokenizer.json"
    sys.exit(f"official tokenizer.json not found under {[str(r) for r in roots]}; set TINYQWEN_SHARED")


def one_pass(encode, docs: list[str]) -> float:  # seconds
    start = time.perf_counter()
    for doc in docs:
        encode(doc)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.1, help="corpus size in MB (UTF-8 bytes / 1e6)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="cold passes per tokenizer (median is reported)"
    )
    args = parser.parse_args()

    import tokenizers

    docs = mixed_documents(int(args.mb * 1_000_000))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    path = find_tokenizer_json()
    ours = Tokenizer.qwen3()
    theirs_file = str(path)

    cold_ours, cold_theirs, warm_ours, warm_theirs = [], [], [], []
    for _ in range(args.repeats):
        ours._cache.clear()  # a cold cache, like a fresh tokenizer
        cold_ours.append(one_pass(ours.encode, docs))
        warm_ours.append(one_pass(ours.encode, docs))
        theirs = tokenizers.Tokenizer.from_file(theirs_file)  # fresh: its BPE cache starts empty
        encode = theirs.encode
        cold_theirs.append(one_pass(lambda d, encode=encode: encode(d, add_special_tokens=False), docs))
        warm_theirs.append(one_pass(lambda d, encode=encode: encode(d, add_special_tokens=False), docs))

    same = all(ours.encode(d) == theirs.encode(d, add_special_tokens=False).ids for d in docs)
    print(f"text: {len(docs)} documents, {mb:.2f} MB (tests/tokenizer_corpus.py); ids identical: {same}")
    print(f"tokenizers {tokenizers.__version__}, single thread; median of {args.repeats} passes")
    rows = [("cold", cold_ours, cold_theirs), ("warm", warm_ours, warm_theirs)]
    for name, a, b in rows:
        ours_mbs, theirs_mbs = mb / statistics.median(a), mb / statistics.median(b)
        print(
            f"{name}: tinyqwen {ours_mbs:6.2f} MB/s   tokenizers {theirs_mbs:6.2f} MB/s   "
            f"ratio {ours_mbs / theirs_mbs:.2f}x"
        )


if __name__ == "__main__":
    main()
