"""The checks on `Tokenizer.__call__`'s Hugging Face-style arguments: each bad value is one line naming it.

>>> _check_texts(["a", "b"])
['a', 'b']
>>> _check_texts([b"a"])
Traceback (most recent call last):
...
tinyqwen.errors.TokenizerError: expected a str or a list of str, got a list holding bytes
"""

from __future__ import annotations

from collections.abc import Sequence

from tinyqwen.errors import TokenizerError


def _check_add_special_tokens(value) -> None:
    if not isinstance(value, bool):
        raise TokenizerError(f"add_special_tokens must be True or False, got {value!r}")


def _check_texts(text) -> list[str]:
    """`__call__`'s batch: a sequence of str (not bytes), as a list."""
    if isinstance(text, bytes) or not isinstance(text, Sequence) or not all(isinstance(t, str) for t in text):
        raise TokenizerError(f"expected a str or a list of str, got {_describe(text)}")
    return list(text)


def _check_return_tensors(return_tensors) -> None:
    if return_tensors not in (None, "np"):
        raise TokenizerError(
            f"return_tensors must be None or 'np' (tinyqwen has no torch), got {return_tensors!r}"
        )


def _describe(value) -> str:  # "bytes", "a list holding int, str"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return type(value).__name__
    return "a list holding " + ", ".join(sorted({type(v).__name__ for v in value}))


def _as_array(rows: list[list[int]], name: str):
    import numpy as np  # only for return_tensors="np"

    if not rows:
        return np.zeros((0, 0), dtype=np.int64)
    if len({len(row) for row in rows}) > 1:
        raise TokenizerError(
            f"return_tensors='np' needs rows of one length, but the {name} have lengths "
            f"{sorted({len(row) for row in rows})}: pass padding=True"
        )
    return np.array(rows, dtype=np.int64).reshape(len(rows), -1)  # [batch, T]
