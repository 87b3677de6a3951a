"""Reading the reply as it is generated: the reasoning split and the tool-call parser of a Qwen3 server.

What the model writes between `<think>` and `</think>` goes to `reasoning_content`, the rest to `content`
(vLLM's `--reasoning-parser qwen3`); `<tool_call>{json}</tool_call>` blocks become OpenAI `tool_calls` (vLLM's
hermes tool parser). Stop strings end a part; each part is stripped of newlines at both ends (Qwen's model card
`.strip("\\n")`), and streamed deltas are the same text cut into pieces, so joining the deltas gives exactly
the non-streamed message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from tinyqwen.chat_parsing import parse_tool_calls
from tinyqwen.errors import ToolCallParseError
from tinyqwen.thinking import _last_open


class _Channel:
    """One part of the reply (reasoning or answer) on its way out: stop strings, then newline trimming.

    Text that might be the start of a stop string, and newlines that might be the last characters of the part,
    are held back until the next piece shows what they are. `push` returns what can be sent now.

    >>> c = _Channel(stops=["END"], strip=True)
    >>> [c.push(t) for t in ["\\nHel", "lo\\n", "EN", "D more"]], c.stopped, c.close()
    (['Hel', 'lo', '', ''], True, '')
    """

    def __init__(self, stops: Sequence[str] = (), strip: bool = False):
        self.stops, self.strip = [s for s in stops if s], strip
        self.text, self.sent = "", 0  # everything received; how much of it has passed the stop check
        self.started, self.held = not strip, ""  # newline trimming: seen a non-newline yet; newlines held
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self.text) - self._partial_stop()
        ready, self.sent = self.text[self.sent : end], max(self.sent, end)
        return self._trim(ready)

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that a stop string starts with (it may still complete)."""
        for n in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def _trim(self, text: str) -> str:
        if not self.strip:
            return text
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip("\n")
        self.held = text[len(body) :]
        return body

    def close(self) -> str:
        """End of the part: release held-back text that never became a stop string; trailing newlines go."""
        rest = "" if self.stopped else self._trim(self.text[self.sent :])
        self.sent, self.held = len(self.text), ""
        return rest


@dataclass
class ParsedReply:
    """What a finished reply amounts to (the non-streamed message is built from it)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    stopped_by: str | None = None  # "eos", "stop" (a stop string), or None (ran out of max_tokens)


class ReplyParser:
    """Turns generated ids, one at a time, into deltas: ("reasoning", text), ("content", text); at the end the
    tool calls. vLLM's qwen3 reasoning parser and hermes tool parser, folded into one small state machine:

        content ──<think>──► reasoning ──</think>──► content ──<tool_call>──► tool (held until the end)

    The same parser serves the streamed and the non-streamed reply, so the two always agree.

    >>> from tinyqwen.tokenizer import Tokenizer
    >>> tok = Tokenizer.qwen3()
    >>> p = ReplyParser(tok, eos_ids=[151645])
    >>> ids = tok.encode("<think>\\nHmm.\\n</think>\\n\\nHi!<|im_end|>", allowed_special="all")
    >>> [d for t in ids for d in p.push(t)] + p.finish()  # one delta per token that adds text
    [('reasoning', 'Hmm'), ('reasoning', '.'), ('content', 'Hi'), ('content', '!')]
    >>> p.reply.reasoning, p.reply.content, p.reply.stopped_by
    ('Hmm.', 'Hi!', 'eos')
    """

    def __init__(
        self,
        tokenizer,
        eos_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        tools: bool = False,
        reasoning: bool = True,
        prompt_ids: Sequence[int] = (),
    ):
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        ids = tokenizer.token_to_id
        self.think, self.end_think = (ids("<think>"), ids("</think>")) if reasoning else (None, None)
        self.tool_open = ids("<tool_call>") if tools else None
        self.stops, self.strip = list(stops), reasoning
        self.mode = "reasoning" if reasoning and _last_open(prompt_ids) else "content"
        self.channels = {name: _Channel(self.stops, self.strip) for name in ("reasoning", "content")}
        self.decoder = tokenizer.stream_decoder()
        self.tool_text = ""
        self.reply = ParsedReply()

    @property
    def stopped(self) -> bool:
        """The reply is over: an eos id or a stop string was seen."""
        return self.reply.stopped_by is not None

    def push(self, token: int) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        if token in self.eos:
            self.reply.stopped_by = "eos"
            return []
        if token == self.think and self.mode == "content":
            return self._switch("reasoning")
        if token == self.end_think and self.mode == "reasoning":
            return self._switch("content")
        if token == self.tool_open and self.mode == "content":
            out = self._switch("tool")
            self.tool_text = "<tool_call>"
            return out
        return self._text(self.decoder.push(token))

    def _text(self, text: str) -> list[tuple[str, str]]:
        if self.mode == "tool":
            self.tool_text += text
            return []
        channel = self.channels[self.mode]
        piece = channel.push(text)
        if channel.stopped:
            self.reply.stopped_by = "stop"
        return self._record(self.mode, piece)

    def _switch(self, mode: str) -> list[tuple[str, str]]:
        out = self._text(self.decoder.flush())
        if self.mode == "reasoning":  # a part ends: its held-back newlines are dropped
            out += self._record("reasoning", self.channels["reasoning"].close())
        self.mode = mode
        return out

    def _record(self, name: str, text: str) -> list[tuple[str, str]]:
        if not text:
            return []
        setattr(self.reply, name, getattr(self.reply, name) + text)
        return [(name, text)]

    def finish(self) -> list[tuple[str, str]]:
        """End of generation: flush what was held back, parse the tool calls."""
        out = self._text(self.decoder.flush()) if not self.stopped or self.mode == "tool" else []
        if self.mode == "tool":
            out += self._tool_calls()
        for name in ("reasoning", "content"):
            out += self._record(name, self.channels[name].close())
        return out

    def _tool_calls(self) -> list[tuple[str, str]]:
        try:
            rest, calls = parse_tool_calls(self.tool_text)
        except ToolCallParseError:  # a malformed or cut-off call: the client gets the text as it is
            return self._record("content", self.channels["content"].push(self.tool_text))
        for call in calls:
            self.reply.tool_calls.append({
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
            })  # fmt: skip
        return self._record("content", self.channels["content"].push(rest))
