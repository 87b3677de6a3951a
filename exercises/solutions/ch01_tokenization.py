"""Chapter 1 solutions: Qwen3's byte-level BPE tokenizer written out with the standard library and `regex`
(tinyqwen/tokenizer/ is the library's version, with a faster merge loop and many more checks)."""

from __future__ import annotations

import codecs
import heapq
import unicodedata
from collections import Counter, defaultdict
from itertools import pairwise

import regex

# The Qwen2/Qwen3 pre-tokenizer regex, verbatim from the official tokenizer.json.
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT = regex.compile(SPLIT_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    # the printable Latin-1 bytes stand for themselves; the other 68 get chr(256), chr(257), ... in byte order,
    # so every byte has a visible one-character stand-in (a vocab file can then be plain text)
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_SYMBOL = bytes_to_unicode()
_SYMBOL_TO_BYTE = {s: b for b, s in _BYTE_TO_SYMBOL.items()}


def to_symbols(text: str) -> str:
    return "".join(_BYTE_TO_SYMBOL[b] for b in text.encode("utf-8"))  # one stand-in per BYTE


def pretokenize(text: str) -> list[str]:
    return _SPLIT.findall(text)  # every match in order; together they are the whole text


def bpe(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(symbols)  # start from single characters (bytes)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        known = [(rank, i) for rank, i in pairs if rank is not None]
        if not known:
            break
        rank, _ = min(known)  # the lowest rank: the merge that was learned first
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence of that pair, left to right
            if i + 1 < len(parts) and ranks.get((parts[i], parts[i + 1])) == rank:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def encode_ordinary(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    text = unicodedata.normalize("NFC", text)  # Qwen's normalizer: "e" + combining accent becomes "é" first
    cache: dict[str, list[int]] = {}  # the same piece comes back again and again in real text
    ids: list[int] = []
    for piece in pretokenize(text):
        if piece not in cache:
            cache[piece] = [vocab[s] for s in bpe(to_symbols(piece), ranks)]
        ids += cache[piece]
    return ids


def encode(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], added: dict[str, int]
) -> list[int]:
    if not added:
        return encode_ordinary(text, vocab, ranks)
    # added tokens are found in the RAW text, before normalisation and splitting; sorting the alternatives
    # longest first makes the regex prefer the longer of two tokens that start at the same place
    specials = regex.compile("|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)))
    ids: list[int] = []
    start = 0
    for match in specials.finditer(text):
        ids += encode_ordinary(text[start : match.start()], vocab, ranks)
        ids.append(added[match.group()])
        start = match.end()
    return ids + encode_ordinary(text[start:], vocab, ranks)


def _token_bytes(token: str) -> bytes:
    if all(ch in _SYMBOL_TO_BYTE for ch in token):
        return bytes(_SYMBOL_TO_BYTE[ch] for ch in token)  # stand-ins back to their bytes
    return token.encode("utf-8")  # an added token such as "<|im_end|>" is written as itself


def decode(ids: list[int], id_to_token: dict[int, str]) -> str:
    # join the BYTES first, decode once: a character split over two tokens comes back whole
    return b"".join(_token_bytes(id_to_token[i]) for i in ids).decode("utf-8", errors="replace")


def stream_decode(ids: list[int], id_to_token: dict[int, str]) -> list[str]:
    # Python's incremental UTF-8 decoder holds back exactly the bytes that could still become a character
    # and turns bytes that never can into "�" at once, as decoding the whole text would
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(_token_bytes(id_to_token[i])) for i in ids] + [decoder.decode(b"", final=True)]


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
