"""Training data that exists on every machine: a synthetic mixture of four small "languages" (chapter 13).

Why synthetic: the course must train offline, on a fresh clone, identically everywhere, with nothing whose licence
we would have to check. Python's own docstrings are offline too, but they differ between Python versions (the
corpus, and so every stored number, would change with the interpreter). A seeded generator is byte-identical on
every machine, costs nothing to ship, and its parts are *different enough that experts can specialise*:

    arith     "417 + 88 = 505"                          digits and operators; the answer is computable
    words     "sort: pear fig kiwi -> fig kiwi pear"    list manipulation (sort / reverse / first / last)
    english   "the small cat saw a red ball ."          a tiny grammar: determiners, adjectives, nouns, verbs
    code      "def scale_3(x):\\n    return x * 3"       Python-like snippets: keywords, names, indentation

Each document is one sample of one task; documents are joined by `<|endoftext|>`. `synthetic_documents(n, seed)`
is deterministic (numpy's default_rng). `corpus_stats` says how big it is.

Tokenizer: a byte-level BPE trained on this corpus (`train_bpe`), with the *same* pre-tokenizer regex and byte
alphabet as Qwen3 (chapter 1), written as vocab.json + merges.txt + tokenizer_config.json — the files an official
checkpoint ships — so `tinyqwen.Tokenizer.from_pretrained` and `tinyqwen generate` read it like Qwen3's own.
Why not Qwen3's 151,669-token vocabulary: the embedding and lm_head alone would be 151,936 × hidden parameters and
the output projection would cost ~300× the rest of a tiny model per token; 512 tokens keep training on 2 cores
about the transformer, not about a giant softmax.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import regex

from tinyqwen.tokenizer import Tokenizer, bytes_to_unicode, nfc, pre_tokenize, text_to_symbols

TASKS = ("arith", "words", "english", "code")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS = "<|endoftext|>"

_FRUITS = "apple pear fig kiwi plum lime mango peach grape lemon melon date cherry olive".split()
_DET = "the a every one this that".split()
_ADJ = "small big red blue old young quiet happy green dark bright tall".split()
_NOUN = "cat dog bird fish child river tree house ball book star boat".split()
_VERB = "saw found liked chased made took watched heard followed painted".split()
_PREP = "near under over behind beside with".split()
_NAMES = "x y n value item total count size".split()


def _arith(g: np.random.Generator) -> str:
    op = g.choice(["+", "-", "*"])
    a, b = int(g.integers(0, 1000 if op != "*" else 100)), int(g.integers(0, 1000 if op != "*" else 10))
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {result}"


def _words(g: np.random.Generator) -> str:
    items = [str(w) for w in g.choice(_FRUITS, size=int(g.integers(2, 6)), replace=False)]
    kind = g.choice(["sort", "reverse", "first", "last"])
    answer = {
        "sort": " ".join(sorted(items)),
        "reverse": " ".join(reversed(items)),
        "first": items[0],
        "last": items[-1],
    }[kind]
    return f"{kind}: {' '.join(items)} -> {answer}"


def _noun_phrase(g: np.random.Generator) -> str:
    words = [str(g.choice(_DET))]
    if g.random() < 0.6:
        words.append(str(g.choice(_ADJ)))
    words.append(str(g.choice(_NOUN)))
    return " ".join(words)


def _english(g: np.random.Generator) -> str:
    s = f"{_noun_phrase(g)} {g.choice(_VERB)} {_noun_phrase(g)}"
    if g.random() < 0.4:
        s += f" {g.choice(_PREP)} {_noun_phrase(g)}"
    return s + " ."


def _code(g: np.random.Generator) -> str:
    name, k = str(g.choice(_NAMES)), int(g.integers(2, 10))
    kind = g.choice(["scale", "shift", "check", "loop"])
    if kind == "scale":
        return f"def scale_{k}({name}):\n    return {name} * {k}"
    if kind == "shift":
        return f"def shift_{k}({name}):\n    return {name} + {k}"
    if kind == "check":
        return f"def is_big({name}):\n    if {name} > {k}:\n        return True\n    return False"
    return f"for {name} in range({k}):\n    print({name})"


_MAKERS = {"arith": _arith, "words": _words, "english": _english, "code": _code}


def synthetic_documents(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (task, text) pairs, tasks in equal proportion, deterministic for a seed.

    >>> synthetic_documents(4, seed=0)[0][0] in TASKS
    True
    """
    g = np.random.default_rng(seed)
    tasks = g.choice(len(TASKS), size=n)
    return [(TASKS[t], _MAKERS[TASKS[t]](g)) for t in tasks]


# --------------------------------------------------------------------------------------------- BPE training


def word_counts(texts: list[str], special_tokens: tuple[str, ...] = ()) -> Counter[tuple[str, ...]]:
    """How often each pre-tokenized word occurs, each word as its tuple of byte symbols: what BPE trains on.

    Text is NFC-normalised and split with Qwen2's regex, as the encoder does (chapter 1), so merges never cross
    a word boundary; a special token is cut out first, so no merge ever spans one.

    >>> word_counts(["hi hi<|endoftext|>hi"], ("<|endoftext|>",))
    Counter({('h', 'i'): 2, ('Ġ', 'h', 'i'): 1})
    """
    cut = regex.compile("|".join(regex.escape(t) for t in special_tokens)) if special_tokens else None
    pieces: Counter[str] = Counter()
    for text in texts:
        for part in cut.split(text) if cut else (text,):
            pieces.update(pre_tokenize(nfc(part)))
    # count the distinct pieces first: a corpus has far fewer distinct words than words
    return Counter({tuple(text_to_symbols(piece)): n for piece, n in pieces.items()})


def learn_merges(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """Up to `n_merges` merges, most frequent adjacent pair first, counting each word `words[word]` times.

    Tie-break: among pairs of equal count, the one that sorts first as a tuple of symbol strings (the strings
    of vocab.json and merges.txt), e.g. ('a', 'b') before ('a', 'c') before ('b', 'a'). Any fixed rule
    would do; this one makes a run reproducible.

    Incremental: a merge changes only the words that contain the pair, so only their pairs are recounted. The
    counts live in a dict, the most frequent pair comes off a heap of (-count, pair), and a heap entry whose
    count is no longer the pair's count is stale and skipped (cheaper than finding and removing it). A naive
    trainer recounts every pair of every word after each merge: the same merges, ~40× slower on 130 kB of
    English-like text with vocabulary 500 (benchmarks/bench_bpe_training.py).

    >>> learn_merges({("a", "a", "a", "b"): 1, ("Ġ", "a", "a", "a", "b"): 1}, 2)  # 'a a' 4×, then 'a b' 2×
    [('a', 'a'), ('a', 'b')]
    """
    seqs = [list(w) for w in words]  # each distinct word, as its current symbols
    counts = list(words.values())
    pair_count: dict[tuple[str, str], int] = defaultdict(int)  # pair -> occurrences in the corpus
    # pair -> the words (indices) that contain it, or did: see _merge_and_count
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (w, c) in enumerate(zip(seqs, counts, strict=True)):
        for pair in zip(w, w[1:], strict=False):
            pair_count[pair] += c
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        neg, best = heapq.heappop(heap)
        if pair_count.get(best) != -neg:
            continue  # stale: the pair's count changed after this entry was pushed
        merges.append(best)
        touched = {best}
        joined = best[0] + best[1]  # one string object for every occurrence: its hash is computed once
        for i in where.pop(best):
            seqs[i] = _merge_and_count(seqs[i], best, joined, counts[i], i, pair_count, where, touched)
        for pair in touched:
            c = pair_count[pair]
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            else:  # best itself, and pairs the merge used up
                del pair_count[pair]
                where.pop(pair, None)
    return merges


def _merge_and_count(
    word: list[str],
    pair: tuple[str, str],
    ab: str,
    count: int,
    index: int,
    pair_count: dict[tuple[str, str], int],
    where: dict[tuple[str, str], set[int]],
    touched: set[tuple[str, str]],
) -> list[str]:
    """`word` (number `index`, occurring `count` times) with every `pair` merged into `ab`, left to right; the
    corpus pair counts updated around each merge only, the pairs whose count changed added to `touched`.

    At a merge of (a, b) into ab at position i, three pairs change: (left, a) becomes (left', ab), where left' is
    the new left neighbour (itself ab if the merge just before ended there); (a, b) goes; (b, right) becomes
    (ab, right) unless `right` starts the next merge (that merge fixes the pair between them as its left side).
    "a a a" with (a, a): (a, a) -1 at the merge, then (a, a) -1 and (aa, a) +1 on its right: "aa a"'s one pair.
    A word keeps its index in `where` under a pair that left it; a later merge of that pair finds nothing to do.
    """
    a, b = pair
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            pair_count[pair] -= count
            if out:  # left side
                old, new = (word[i - 1], a), (out[-1], ab)
                pair_count[old] -= count
                pair_count[new] += count
                touched.add(old)
                touched.add(new)
                where[new].add(index)
            j = i + 2
            if j < n and not (j + 1 < n and word[j] == a and word[j + 1] == b):  # right side
                old, new = (b, word[j]), (ab, word[j])
                pair_count[old] -= count
                pair_count[new] += count
                touched.add(old)
                touched.add(new)
                where[new].add(index)
            out.append(ab)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(
    texts: list[str], vocab_size: int, special_tokens: tuple[str, ...] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: start from the 256 byte symbols, repeatedly merge the most frequent adjacent pair.

    Pre-tokenization (NFC, then Qwen2's regex: `word_counts`) splits text into words first, so merges never cross
    a word boundary — the same rule chapter 1's encoder applies; `special_tokens` are cut out of the text first.
    Ties go to the pair that sorts first (`learn_merges`). Returns (vocab {symbol string: id}, merges in rank
    order); `vocab_size` counts the byte symbols and the merges (the special tokens come on top). Fewer merges
    come back when no pair is left to merge.

    >>> vocab, merges = train_bpe(["aaab aaab"], 258)   # words "aaab" and "Ġaaab" (Ġ: the byte symbol of a space)
    >>> merges   # 'a a' occurs 4 times; then 'aa a' and 'a b' twice each: the tie goes to the pair sorting first
    [('a', 'a'), ('a', 'b')]
    """
    vocab = {s: i for i, s in enumerate(sorted(bytes_to_unicode().values(), key=_byte_rank))}
    merges = learn_merges(word_counts(texts, special_tokens), max(0, vocab_size - len(vocab)))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return vocab, merges


def _byte_rank(symbol: str) -> int:
    # byte symbols in the order of their byte value (id b for byte b), as in Qwen3's vocabulary
    return {s: b for b, s in bytes_to_unicode().items()}[symbol]


def save_tokenizer(folder: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json in Qwen3's layout (specials as added tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    added = {
        str(len(vocab) + i): {
            "content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": 4096,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- the data set


def build_dataset(
    n_docs: int, seed: int, vocab_size: int, val_fraction: float, tokenizer_dir: str | Path
) -> dict[str, np.ndarray]:
    """Generate the corpus, train the tokenizer on its training part, save it, and tokenise everything.

    Returns {"train": ids, "val": ids, "train_task": task index per token, "val_task": ...}; documents are
    separated by <|endoftext|>. The validation documents are the last `val_fraction` of the draws (the tokenizer
    never saw them).
    """
    docs = synthetic_documents(n_docs, seed)
    n_val = max(1, int(n_docs * val_fraction))
    train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    vocab, merges = train_bpe([t for _, t in train_docs], vocab_size - len(SPECIAL_TOKENS))
    save_tokenizer(tokenizer_dir, vocab, merges)
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    eos = tok.token_to_id(EOS)
    out = {}
    for split, part in (("train", train_docs), ("val", val_docs)):
        ids, task = [], []
        for name, text in part:
            piece = tok.encode(text) + [eos]
            ids.extend(piece)
            task.extend([TASKS.index(name)] * len(piece))
        out[split], out[split + "_task"] = np.array(ids, dtype=np.int64), np.array(task, dtype=np.int8)
    return out


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy on `val` of the best context-free model: token frequencies of `train` (add-one smoothed).

    A model that learned nothing about order scores this; a language model must go well below it.
    """
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())
