"""Reading the reply as it is generated: the reasoning split and the tool-call parser of a Qwen3 server.

What the model writes as its thinking goes to `reasoning_content`, the rest to `content` (vLLM's
`--reasoning-parser qwen3`); `<tool_call>...</tool_call>` blocks become OpenAI `tool_calls` (vLLM's hermes tool
parser for Qwen3's JSON form, its qwen3_coder parser for Qwen3.5's `<function=...>` form). Each part is the text
as generated, newlines included, as vLLM sends it; stop strings end a part, and streamed deltas are the same text
cut into pieces, so joining the deltas gives exactly the non-streamed message.

The rules, each vLLM's (its cases run in tests/test_serve_parity.py):

- Thinking is on unless the request turned it off (`enable_thinking=False`, whose template pre-fills an empty
  think block) or the prompt already closed it: then everything is content. When it is on the reply starts as
  reasoning, whether the model writes `<think>` first (Qwen3) or the template already did (Qwen3.5); a reply cut
  off before `</think>` is all reasoning.
- `</think>` ends the reasoning; so does a `<tool_call>` written inside it (Qwen3.5 calls tools mid-thought).
- A part with no text is None (JSON null), not "": `ParsedReply` holds it so, as vLLM's parser returns it.

Deliberate differences from vLLM, each small: a `<tool_call>` ends the reasoning as soon as the token is written
(vLLM waits to see `<function=` after it, so Qwen3's JSON form inside the thinking stays reasoning there); beside
tool calls, an answer of whitespace only (the "\\n\\n" after `</think>`) is null, not "\\n\\n" -- a client that sends
the message back would otherwise put those newlines in the next prompt, where the template never writes them; and
text after the calls is kept when it is more than whitespace (vLLM keeps only the text before the first call).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from tinyqwen.chat_parsing import parse_tool_calls
from tinyqwen.errors import ToolCallParseError
from tinyqwen.thinking import IM_START_ID, THINK_END_ID, THINK_START_ID


class _Channel:
    """One part of the reply (reasoning or answer) on its way out: stop strings, then (optionally) newline trimming.

    Text that might be the start of a stop string is held back until the next piece shows what it is; with
    `strip=True` (Qwen's model card `.strip("\\n")`, which chapter 12's client uses; the server does not strip)
    so are newlines that might be the last characters of the part. `push` returns what can be sent now.

    >>> c = _Channel(stops=["END"], strip=True)
    >>> [c.push(t) for t in ["\\nHel", "lo\\n", "EN", "D more"]], c.stopped, c.close()
    (['Hel', 'lo', '', ''], True, '')
    >>> c = _Channel(stops=["END"])
    >>> [c.push(t) for t in ["\\nHel", "lo\\n", "EN", "D more"]], c.stopped
    (['\\nHel', 'lo\\n', '', ''], True)
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

    reasoning: str | None = None  # None: no text (null in the message, as vLLM sends it)
    content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    stopped_by: str | None = None  # "eos", "stop" (a stop string), or None (ran out of max_tokens)


class ReplyParser:
    """Turns generated ids, one at a time, into deltas: ("reasoning", text), ("content", text); at the end the
    tool calls. vLLM's qwen3 reasoning parser and its tool parsers, folded into one small state machine:

        reasoning ──</think> or <tool_call>──► content ──<tool_call>──► tool (held until the end)

    It starts in reasoning when thinking is on (`thinking`, and the prompt has not closed a think block), else in
    content; a `<think>` at the very start of the reply is dropped. With `tools` (True, or the request's tool list,
    whose schemas type the values of Qwen3.5's `<function=...>` form) a `<tool_call>` starts the calls, parsed at
    the end; without, it is text. The same parser serves the streamed and the non-streamed reply, so the two always
    agree.

    >>> from tinyqwen.tokenizer import Tokenizer
    >>> tok = Tokenizer.qwen3()
    >>> p = ReplyParser(tok, eos_ids=[151645])
    >>> ids = tok.encode("<think>\\nHmm.\\n</think>\\n\\nHi!<|im_end|>", allowed_special="all")
    >>> [d for t in ids for d in p.push(t)] + p.finish()  # one delta per token that adds text
    [('reasoning', '\\n'), ('reasoning', 'Hmm'), ('reasoning', '.\\n'), ('content', '\\n\\n'), ('content', 'Hi'), ('content', '!')]
    >>> p.reply.reasoning, p.reply.content, p.reply.stopped_by
    ('\\nHmm.\\n', '\\n\\nHi!', 'eos')
    """

    def __init__(
        self,
        tokenizer,
        eos_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        tools: bool | Sequence[dict] = False,
        reasoning: bool = True,
        prompt_ids: Sequence[int] = (),
        thinking: bool = True,
    ):
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        ids = tokenizer.token_to_id
        self.think, self.end_think = (ids("<think>"), ids("</think>")) if reasoning else (None, None)
        self.tool_open = ids("<tool_call>") if reasoning or tools else None
        self.tools = bool(tools)
        listed = tools if isinstance(tools, Sequence) else ()
        self.schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in listed}
        self.stops = list(stops)
        state = prompt_think_state(prompt_ids)
        self.mode = (
            "reasoning" if reasoning and (state == "open" or (thinking and state is None)) else "content"
        )
        self.fresh = True  # nothing generated yet: a <think> here opens the reasoning
        self.channels = {name: _Channel(self.stops) for name in ("reasoning", "content")}
        self.decoder = tokenizer.stream_decoder()
        self.tool_text, self.lead = "", ""
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
        fresh, self.fresh = self.fresh, False
        if token == self.think and fresh and self.think is not None:
            return self._switch("reasoning")  # Qwen3 writes <think> itself; Qwen3.5's template already did
        if token == self.end_think and self.mode == "reasoning":
            return self._switch("content")
        if token == self.tool_open and self.mode != "tool":
            out = self._switch("content") if self.mode == "reasoning" else []  # a call ends the thinking
            if not self.tools:
                return out + self._text(self.decoder.push(token))
            out += self._switch("tool")
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
        if self.mode == "reasoning" and mode != "reasoning":  # the part ends: release what was held back
            out += self._record("reasoning", self.channels["reasoning"].close())
        self.mode = mode
        return out

    def _record(self, name: str, text: str) -> list[tuple[str, str]]:
        if name == "content" and self.tools and not self.reply.content:
            # whitespace that opens the answer waits: before a tool call it is dropped (content is then null),
            # otherwise it goes out with the first visible text, or at the end
            self.lead += text
            if not self.lead.strip():
                return []
            text, self.lead = self.lead, ""
        if not text:
            return []
        setattr(self.reply, name, (getattr(self.reply, name) or "") + text)
        return [(name, text)]

    def finish(self) -> list[tuple[str, str]]:
        """End of generation: flush what was held back, parse the tool calls."""
        out = self._text(self.decoder.flush()) if not self.stopped or self.mode == "tool" else []
        if self.mode == "tool":
            out += self._tool_calls()
        for name in ("reasoning", "content"):
            out += self._record(name, self.channels[name].close())
        if self.lead and not self.reply.tool_calls:  # an answer of whitespace only, as generated
            self.reply.content, self.lead = self.lead, ""
            out.append(("content", self.reply.content))
        return out

    def _tool_calls(self) -> list[tuple[str, str]]:
        try:
            rest, calls = parse_tool_calls(self.tool_text, self.schemas, strip=False)
        except ToolCallParseError:  # a malformed or cut-off call: the client gets the text as it is
            return self._record("content", self.channels["content"].push(self.tool_text))
        for call in calls:
            self.reply.tool_calls.append({
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
            })  # fmt: skip
        # text between or after the calls is kept when it says something (vLLM keeps only the text before them)
        return self._record("content", self.channels["content"].push(rest if rest.strip() else ""))


def prompt_think_state(prompt_ids: Sequence[int]) -> str | None:
    """How the prompt's last message leaves the think block: "open" (it ends inside `<think>`, as Qwen3.5's
    template writes it), "closed" (`</think>` after it: `enable_thinking=False`'s empty block), or None.

    >>> prompt_think_state([151644, 77091, 198, 151667, 198]), prompt_think_state([151644, 77091, 198])
    ('open', None)
    >>> prompt_think_state([151644, 77091, 198, 151667, 271, 151668, 271])
    'closed'
    """
    for token in reversed(list(prompt_ids)):
        if token == IM_START_ID:
            return None
        if token == THINK_START_ID:
            return "open"
        if token == THINK_END_ID:
            return "closed"
    return None
