"""How replies and errors reach the terminal: thinking dimmed apart from the answer, streamed token by token; a
reply's (thinking, answer) text; input that is not UTF-8 and errors, each said in one line."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tinyqwen.thinking import THINK_END_ID, THINK_START_ID


@dataclass
class Style:
    """How thinking is shown apart from the answer: dim text between labels (labels alone without colour)."""

    color: bool

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color and text else text

    @classmethod
    def for_stream(cls, stream, disabled: bool) -> Style:
        return cls(color=not disabled and "NO_COLOR" not in os.environ and stream.isatty())


class ReplyPrinter:
    """Streams a reply's ids to the terminal as text: thinking dimmed between [thinking] labels, then the answer.

    The tokenizer's stream decoder holds back bytes of a character that is not complete yet, so multi-byte
    characters split over several tokens print correctly.
    """

    def __init__(self, tokenizer, style: Style, out=sys.stdout, eos_ids=()):
        self.tokenizer, self.style, self.out, self.eos_ids = tokenizer, style, out, set(eos_ids)
        self.decoder = tokenizer.stream_decoder()
        self.thinking = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(self.style.dim(text) if self.thinking else text)
            self.out.flush()

    def push(self, token: int) -> None:
        if token == THINK_START_ID:
            self._write(self.decoder.flush())
            self.thinking = True
            self._write("[thinking]")
        elif token == THINK_END_ID:
            self._write(self.decoder.flush())
            self._write("[/thinking]")
            self.thinking = False
        elif token not in self.eos_ids:
            self._write(self.decoder.push(token))

    def close(self) -> None:
        self._write(self.decoder.flush())
        if self.thinking:  # cut off while thinking (max tokens, Ctrl-C)
            self._write("[/thinking]")
            self.thinking = False
        self.out.write("\n")
        self.out.flush()


def answer_text(tokenizer, ids: list[int], eos: tuple[int, ...]) -> tuple[str, str]:
    """(thinking, answer) as text, eos dropped.

    A reply cut off inside `<think>` (Ctrl-C, max tokens) has no answer yet: its open think block is thinking,
    never part of the answer, so an unclosed `<think>` never reaches a chat's history.
    """
    from tinyqwen.chat_parsing import split_thinking

    ids = [t for t in ids if t not in eos]
    opened = max((i for i, t in enumerate(ids) if t == THINK_START_ID), default=None)
    unfinished: list[int] = []
    if opened is not None and THINK_END_ID not in ids[opened:]:
        ids, unfinished = ids[:opened], ids[opened + 1 :]
    thinking, content = split_thinking(ids)
    return tokenizer.decode(thinking + unfinished).strip(), tokenizer.decode(content).strip()


def undecodable(text: str) -> str | None:
    """A one-line complaint when `text` holds a lone surrogate, else None.

    Python reads bytes that are not UTF-8 (a terminal in another encoding, a broken paste) as lone surrogates
    U+DC80..U+DCFF ("surrogateescape"), which are not Unicode text and cannot be tokenized.

    >>> undecodable("caf\\udcff!")
    "byte 0xff at character 4 (after 'caf') is not UTF-8 text; is the terminal set to UTF-8?"
    >>> undecodable("café") is None
    True
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        char, before = text[e.start], text[max(0, e.start - 20) : e.start]
        what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        return (
            f"{what} at character {e.start + 1} (after {before!r}) is not UTF-8 text; "
            "is the terminal set to UTF-8?"
        )


def one_line(error: BaseException) -> str:
    """An error's message on one line (line breaks and runs of spaces become one space), else its type's name."""
    return " ".join(str(error).split()) or type(error).__name__
