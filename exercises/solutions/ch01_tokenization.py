"""Chapter 1 solutions: the exercise functions as thin adapters over the tinyqwen/tokenizer/ package (solutions mode
grades it)."""

from __future__ import annotations

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
