"""Step 5 of the pipeline: byte-pair encoding (BPE), the heart of the tokenizer.

BPE starts from one symbol per byte and repeatedly glues together the adjacent pair that was learned first. The
merges.txt file lists the learned pairs in order; a pair's line among them is its *rank* (0 = learned first, the
most common pair in the training text). Nothing else decides: no dictionary look-up, no search for the longest
token, just "merge the pair with the lowest rank, leftmost first, until no adjacent pair is in merges.txt".

A worked example with four merges (the real tokenizer has 151,387):

    ranks:   ("l", "l") -> 0    ("h", "e") -> 1    ("he", "ll") -> 2    ("hell", "o") -> 3

    h e l l o       pairs: he=1 el=- ll=0 lo=-    lowest is ll (rank 0)
    h e ll o        pairs: he=1 ell=- llo=-       lowest is he (rank 1)
    he ll o         pairs: hell=2 llo=-           lowest is hell (rank 2)
    hell o          pairs: hello=3                lowest is hello (rank 3)
    hello           one symbol: done

    h a l l o   ->  h a ll o                      after ll, no adjacent pair has a rank: done

The symbols are bytes written as printable characters (see byte_level.py: a space is "Ġ"), and the pieces come
from the split regex (pretokenize.py), so BPE only ever sees one word-sized piece at a time. `merge_symbols` is
what encoding runs; `merge_steps` records each merge for teaching (`Tokenizer.bpe_steps` shows it on real text).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import pairwise

_NO_MERGE = 1 << 62  # "rank" of a pair that has no merge: larger than any real rank
_LONG_WORD = 64  # pieces with more symbols than this use the heap merge (linear-ish instead of quadratic)


def merge_symbols(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one piece: merge the adjacent pair with the lowest rank, leftmost first, until no
    adjacent pair has a merge (step 5). One merge at a time, exactly like the reference.

    >>> ranks = {("l", "l"): 0, ("h", "e"): 1, ("he", "ll"): 2, ("hell", "o"): 3}
    >>> merge_symbols(list("hello"), ranks)
    ['hello']
    >>> merge_symbols(list("hallo"), ranks)
    ['h', 'a', 'll', 'o']
    """
    if len(symbols) > _LONG_WORD:
        return _merge_symbols_heap(symbols, ranks)
    symbols = list(symbols)
    get = ranks.get
    pair_ranks = [get(pair, _NO_MERGE) for pair in pairwise(symbols)]  # [i]: (sym[i], sym[i+1])
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        i = pair_ranks.index(best)  # leftmost of the lowest rank
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get((symbols[i - 1], symbols[i]), _NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = get((symbols[i], symbols[i + 1]), _NO_MERGE)
    return symbols


def _merge_symbols_heap(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """`merge_symbols` for long pieces: a heap of (rank, position) and a linked list of symbols.

    The list version rescans every pair after each merge (quadratic); a run of 10,000 spaces would take seconds.
    This is the reference's own algorithm; heap entries made stale by an earlier merge are skipped when popped.
    """
    sym: list[str | None] = list(symbols)
    nxt = [*range(1, len(sym)), -1]
    prv = list(range(-1, len(sym) - 1))
    heap = []  # (rank, position of the left symbol, merged text): pops lowest rank, then leftmost
    for i in range(len(sym) - 1):
        r = ranks.get((sym[i], sym[i + 1]))
        if r is not None:
            heap.append((r, i, sym[i] + sym[i + 1]))
    heapq.heapify(heap)
    while heap:
        rank, i, merged = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] is None or j == -1 or sym[i] + sym[j] != merged:
            continue  # stale: one side was merged into something else since this entry was pushed
        sym[i], sym[j] = merged, None
        nxt[i] = nxt[j]
        if nxt[j] != -1:
            prv[nxt[j]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if left != -1 and right != -1:
                r = ranks.get((sym[left], sym[right]))
                if r is not None:
                    heapq.heappush(heap, (r, left, sym[left] + sym[right]))
    out, i = [], 0
    while i != -1:
        out.append(sym[i])
        i = nxt[i]
    return out


@dataclass(frozen=True)
class MergeStep:
    """One BPE merge of `merge_steps`: which pair merged, its rank, and the symbols afterwards."""

    rank: int
    pair: tuple[str, str]
    symbols: tuple[str, ...]

    def __str__(self) -> str:
        return f"rank {self.rank:>6}: {self.pair[0]!r} + {self.pair[1]!r} -> {' '.join(self.symbols)}"


def merge_steps(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[MergeStep]:
    """Every merge `merge_symbols` makes on `symbols`, in order: the same loop, written to be watched.

    >>> ranks = {("l", "l"): 0, ("h", "e"): 1, ("he", "ll"): 2, ("hell", "o"): 3}
    >>> for step in merge_steps(list("hello"), ranks):
    ...     print(step)
    rank      0: 'l' + 'l' -> h e ll o
    rank      1: 'h' + 'e' -> he ll o
    rank      2: 'he' + 'll' -> hell o
    rank      3: 'hell' + 'o' -> hello
    """
    symbols = list(symbols)
    steps = []
    while len(symbols) > 1:
        pair_ranks = [ranks.get(pair, _NO_MERGE) for pair in pairwise(symbols)]
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        i = pair_ranks.index(best)  # leftmost of the lowest rank
        pair = (symbols[i], symbols[i + 1])
        symbols[i : i + 2] = [pair[0] + pair[1]]
        steps.append(MergeStep(best, pair, tuple(symbols)))
    return steps
