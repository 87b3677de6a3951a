"""Chapter 1 solutions: the exercise functions as thin adapters over the tinyqwen/tokenizer/ package (solutions mode
grades it)."""

from __future__ import annotations

import heapq
import unicodedata
from collections import Counter, defaultdict
from itertools import pairwise

import regex

from tinyqwen import tokenizer as T

SPLIT_PATTERN = T.QWEN2_SPLIT_PATTERN


def bytes_to_unicode() -> dict[int, str]:
    return dict(T.bytes_to_unicode())


def to_symbols(text: str) -> str:
    return T.text_to_symbols(text)


def pretokenize(text: str) -> list[str]:
    return T.pre_tokenize(text)


def bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    return T.merge_symbols(list(symbols), ranks)


# One tinyqwen Tokenizer per (vocab, ranks, added) the tests pass in; building one checks all 151k merges (~1 s).
_tokenizers: list[tuple[tuple, T.Tokenizer]] = []


def _tokenizer(vocab: dict, ranks: dict, added: dict) -> T.Tokenizer:
    for (v, r, a), tok in _tokenizers:
        if v is vocab and r is ranks and a is added:
            return tok
    pairs = sorted(ranks, key=ranks.__getitem__)
    tokens = [
        T.AddedToken(i, content, special=True) for content, i in sorted(added.items(), key=lambda x: x[1])
    ]
    tok = T.Tokenizer(vocab, (pairs, lambda rank: f"merge {rank}"), tokens)
    _tokenizers.append(((vocab, ranks, added), tok))
    return tok


_NO_ADDED: dict[str, int] = {}


def encode_ordinary(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    return _tokenizer(vocab, ranks, _NO_ADDED).encode(text)


def encode(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], added: dict[str, int]
) -> list[int]:
    return _tokenizer(vocab, ranks, added).encode(text)


def _token_bytes(token: str) -> bytes:
    raw = T.symbols_to_bytes(token)
    return raw if raw is not None else token.encode("utf-8")


def decode(ids: list[int], id_to_token: dict[int, str]) -> str:
    return b"".join(_token_bytes(id_to_token[i]) for i in ids).decode("utf-8", errors="replace")


class _Bytes:
    """What tinyqwen's StreamDecoder asks of a tokenizer: the bytes of one id."""

    def __init__(self, id_to_token: dict[int, str]):
        self.id_to_token = id_to_token

    def _token_bytes(self, token_id: int, skip_special: bool) -> bytes:
        return _token_bytes(self.id_to_token[token_id])


def stream_decode(ids: list[int], id_to_token: dict[int, str]) -> list[str]:
    stream = T.StreamDecoder(_Bytes(id_to_token))  # type: ignore[arg-type]
    return [stream.push(i) for i in ids] + [stream.flush()]


# ---------------------------------------------------------------------------------------- extension: train a BPE


def train_bpe(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[str, str]]:
    # 1. count the distinct pieces (special tokens cut out first, so no merge spans one)
    parts = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
    pieces = Counter(p for part in parts for p in pretokenize(unicodedata.normalize("NFC", part)))
    words = [list(to_symbols(p)) for p in pieces]  # each distinct piece as its current symbols
    freq = list(pieces.values())
    # 2. pair counts, and which pieces hold each pair: a merge visits only those
    count: dict[tuple[str, str], int] = defaultdict(int)
    holders: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in pairwise(w):
            count[pair] += freq[i]
            holders[pair].add(i)

    def move(old, new, n, i, changed):  # n occurrences of pair `old` (in piece i) become pair `new`
        count[old] -= n
        count[new] += n
        holders[new].add(i)
        changed.update((old, new))

    heap = [(-c, pair) for pair, c in count.items()]  # most frequent first; equal counts: smallest pair first
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < vocab_size - 256 - len(special_tokens):
        c, best = heapq.heappop(heap)
        if count.get(best) != -c:
            continue  # out of date: this pair's count changed after the entry was pushed
        merges.append(best)
        a, b = best
        ab, changed = a + b, {best}
        for i in holders.pop(best):
            w, n, out, k = words[i], freq[i], [], 0
            while k < len(w):
                if w[k] == a and k + 1 < len(w) and w[k + 1] == b:
                    # merge here: only the pairs with the neighbours change
                    count[best] -= n
                    if out:  # (left, a) -> (left, ab); left may itself be an ab just merged
                        move((w[k - 1], a), (out[-1], ab), n, i, changed)
                    # (b, right) -> (ab, right), unless right starts the next merge (that one does the pair)
                    nxt = k + 2
                    if nxt < len(w) and not (w[nxt] == a and nxt + 1 < len(w) and w[nxt + 1] == b):
                        move((b, w[nxt]), (ab, w[nxt]), n, i, changed)
                    out.append(ab)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = out
        for pair in changed:
            if count[pair] > 0:
                heapq.heappush(heap, (-count[pair], pair))
            else:
                del count[pair]  # best itself, and pairs this merge used up
    return merges
