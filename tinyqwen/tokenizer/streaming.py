"""Streaming decode: showing generated text token by token without ever printing half a character.

A token is a run of bytes, not of characters, and a character takes 1 to 4 UTF-8 bytes, so a token can end in
the middle of one (an emoji is often split over two tokens). Decoding each token alone would print "�" twice
where the emoji belongs:

    ids          [6023, 26525, 223]              "hi 😁"
    one by one   'hi', ' �', '�'                  each token's bytes decoded alone
    streamed     'hi', ' ', '😁'                  the emoji's first 3 bytes held back until the 4th arrives

`StreamDecoder` keeps the bytes of an unfinished character and releases them when the character is complete;
`incomplete_utf8_tail` is the test it applies. `Tokenizer.stream_decoder()` makes one.
"""

from __future__ import annotations

from typing import Protocol


class TokenBytes(Protocol):
    """What a `StreamDecoder` needs from a tokenizer: the bytes of one id (a `Tokenizer` is one)."""

    def _token_bytes(self, token_id: int, skip_special: bool) -> bytes: ...


def incomplete_utf8_tail(buf: bytes | bytearray) -> int:
    """How many bytes at the end of `buf` are the start of a UTF-8 character still waiting for its other bytes.

    A character takes 1 to 4 bytes and a token may end in the middle of one (an emoji is often split over two
    tokens). Those bytes must be held back, not shown as "�". Bytes that can never become valid are not held:
    they decode to "�" now, exactly as they would in the full text.

    >>> "😀".encode()
    b'\\xf0\\x9f\\x98\\x80'
    >>> incomplete_utf8_tail(b"ok\\xf0\\x9f\\x98"), incomplete_utf8_tail(b"ok\\xf0\\x9f\\x98\\x80")
    (3, 0)
    >>> incomplete_utf8_tail(b"\\xe0\\x80")  # E0 must be followed by A0..BF: invalid already, nothing to wait for
    0
    """
    for k in range(1, min(3, len(buf)) + 1):
        lead = buf[-k]
        if lead < 0x80:
            return 0  # ASCII: everything before and including it is complete
        if lead < 0xC0:
            continue  # a continuation byte: look further back for the lead byte
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if lead < 0xC2 or lead > 0xF4 or k >= need:
            return 0  # an impossible lead byte, or the character is already complete
        if (
            k >= 2
        ):  # the second byte's allowed range depends on the lead (no overlongs, surrogates, > U+10FFFF)
            lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
                lead, (0x80, 0xBF)
            )
            if not lo <= buf[-k + 1] <= hi:
                return 0
        return k
    return 0


class StreamDecoder:
    """Turns token ids into text as they arrive, never emitting half a character.

    >>> from tinyqwen.tokenizer import Tokenizer
    >>> tok = Tokenizer.qwen3()
    >>> ids = tok.encode("hi 😁")  # the emoji's 4 bytes are split over two tokens
    >>> ids, [tok.decode([i]) for i in ids]
    ([6023, 26525, 223], ['hi', ' �', '�'])
    >>> stream = tok.stream_decoder()
    >>> [stream.push(i) for i in ids] + [stream.flush()]
    ['hi', ' ', '😁', '']
    """

    def __init__(self, tokenizer: TokenBytes, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._pending = bytearray()

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete (possibly "")."""
        self._pending += self._tokenizer._token_bytes(token_id, self._skip_special)
        ready = len(self._pending) - incomplete_utf8_tail(self._pending)
        text = self._pending[:ready].decode("utf-8", errors="replace")
        del self._pending[:ready]
        return text

    def flush(self) -> str:
        """End of stream: whatever is held back, with "�" for an unfinished character."""
        text = self._pending.decode("utf-8", errors="replace")
        self._pending.clear()
        return text
