"""Server-sent events (SSE): how a streamed reply travels over HTTP.

A streaming OpenAI endpoint answers with `Content-Type: text/event-stream` and writes one event per chunk,

    data: {"id": "chatcmpl-...", "choices": [{"delta": {"content": "Hi"}, ...}]}\\n\\n

and ends the stream with `data: [DONE]`. `sse` writes one event; `parse_sse` reads a whole body back the way a
client does (the tests and chapter 12 use it to check what the server sent).
"""

from __future__ import annotations

import json


def sse(data: dict | str) -> str:
    """One server-sent event: a `data:` line and a blank line. The OpenAI stream ends with `data: [DONE]`.

    >>> sse({"a": 1}), sse("[DONE]")
    ('data: {"a": 1}\\n\\n', 'data: [DONE]\\n\\n')
    """
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def parse_sse(text: str) -> list[dict | str]:
    """The events of an SSE body: each event's data, JSON-decoded, and the final "[DONE]" as a string.

    The WHATWG rules a client follows: lines end with \\n, \\r\\n or \\r; a blank line ends an event; "data:"
    lines (one space after the colon dropped) are joined with newlines; ":" starts a comment; other fields are
    not data; an event still open when the text ends is dropped.

    >>> parse_sse('data: {"a": 1}\\n\\n: ping\\n\\ndata:[DONE]\\n\\n')
    [{'a': 1}, '[DONE]']
    """
    events: list[dict | str] = []
    data: list[str] | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data is not None:
                joined = "\n".join(data)
                events.append(joined if joined == "[DONE]" else json.loads(joined))
            data = None
        elif line.startswith("data:"):
            value = line[5:]
            data = [*(data or []), value[1:] if value.startswith(" ") else value]
    return events
