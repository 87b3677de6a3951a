# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 12 · Serving
#
# The Qwen3 release does not tell users to call `generate` from Python. It tells them to start a **server** —
# SGLang or vLLM with `--reasoning-parser qwen3` — and talk to it with any **OpenAI-compatible** client: the same
# JSON over HTTP that every chat tool, agent framework and IDE plug-in already speaks. The thinking comes back
# *separated* from the answer, tool calls come back as structured objects, and the text streams in token by token.
#
# `tinyqwen serve --model PATH` is such a server: the package `tinyqwen/serve/`, on Starlette and uvicorn, one
# module per concept (protocol, SSE, reply parser, engine, service, app).
# This chapter takes it apart:
#
# 1. what an OpenAI-compatible server does with a request, and what it sends back;
# 2. **server-sent events** — the wire format of a streamed reply — parsed by hand;
# 3. the **reasoning split**: `reasoning_content` beside `content`, decided token by token while streaming, and
#    why a streaming server may never take back text it sent;
# 4. **tool calls** in OpenAI's format, assembled by a client from streamed pieces, and a full round trip with a
#    small local tool;
# 5. several clients at once: **continuous batching** — one decode step for every running request, prompts
#    prefilled in chunks, KV memory from a budget — and what happens when a client walks away;
# 6. and finally **your client against the real server**, checked against transformers and the official template.

# %%
import asyncio
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from course_setup import REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
import tinyqwen  # noqa: E402
from tinyqwen import serve, testing  # noqa: E402

tok = tinyqwen.Tokenizer.qwen3()
ref = json.loads((REPO / "exercises" / "references" / "ch12_serving.json").read_text(encoding="utf-8"))
ch09 = json.loads((REPO / "exercises" / "references" / "ch09_chat_template_thinking.json").read_text(encoding="utf-8"))

# %% [markdown]
# The model: [chapter 9](09-chat-template-thinking.ipynb)'s tiny Qwen3 — two layers, 32 wide, but the **real**
# 151,936-token vocabulary, so the real tokenizer and chat template apply. Its random weights are made by NumPy
# with a fixed seed (`tinyqwen.testing`: test helpers that ship with the package), and transformers' greedy reply
# to one conversation is stored in `ch09`: we will check the server against it at the end. (`ref` holds this
# chapter's references, made by `exercises/references/make_ch12_serving.py` with the official tokenizer and
# template.)

# %%
folder = Path(tempfile.mkdtemp(prefix="tinyqwen-ch12-"))
testing.write_tiny_qwen3(folder, seed=ch09["end_to_end"]["seed"], scale=testing.END_TO_END_SCALE)
model = tinyqwen.load_model(folder)

# %% [markdown]
# ## What a server does
#
# ```text
#  client                          tinyqwen serve
#  ──────                          ──────────────
#  POST /v1/chat/completions ──►  check the JSON ─► chat template (injection-safe) ─► prompt ids
#  {"model", "messages",                                                                  │
#   "max_tokens", "stream", ...}                       queue ─► one worker thread: generate, token by token
#                                                                                         │
#  JSON reply, or a stream  ◄──  reply parser: <think>…</think> → reasoning_content,     ◄┘
#  of "data: {...}" events       the rest → content, <tool_call>{…}</tool_call> → tool_calls
# ```
#
# Everything in the left column is what the OpenAI API defines; everything on the right is the previous eleven
# chapters plus two small new pieces: the **reply parser** and the **queue**.
#
# An HTTP server such as uvicorn does not know about chat. For each request it calls the application with the
# **ASGI** protocol: `app(scope, receive, send)`, where `scope` is a dict describing the request (method, path,
# headers), `receive()` hands over the body, and the app calls `send()` with the status, the headers and the body —
# in one piece, or in many for a stream. `tinyqwen.testing.asgi_call` plays uvicorn's part in-process, so this
# notebook needs no network:

# %%
app = serve.create_app(model, tok, model_name="tiny-qwen3")
status, headers, body = testing.asgi_call(app, "GET", "/v1/models")
print(status, headers["content-type"])
print(json.dumps(json.loads(body), indent=1))

# %% [markdown]
# ## The request
#
# A chat request names the model and the messages; every other field is optional. The sampling fields map onto
# [chapter 8](08-kv-cache-generation.ipynb)'s `SamplingParams` one to one, with vLLM's names: `temperature`,
# `top_p`, `top_k` (`-1` = off), `min_p`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`,
# `seed`, `max_tokens`, `stop`. A knob left out takes Qwen's preset for the turn's mode (thinking: the
# checkpoint's generation_config.json; non-thinking: $T = 0.7$, top-$p$ 0.8, top-$k$ 20). The penalties act on the
# logits $\ell$ before sampling, with $c_i$ the count of token $i$ in the reply so far:
#
# $$\ell_i \leftarrow \ell_i - p_{\text{presence}}\,[c_i > 0] - p_{\text{frequency}}\,c_i .$$

# %%
def post(body, path="/v1/chat/completions"):
    status, _, raw = testing.asgi_call(app, "POST", path, {"model": "tiny-qwen3", **body})
    return status, raw.decode()


hello = [{"role": "user", "content": "Hello!"}]
status, text = post({"messages": hello, "max_tokens": 6, "temperature": 0})
print(status, json.dumps(json.loads(text), indent=1, ensure_ascii=False))

# %% [markdown]
# The reply carries one `choice` with the `message`, a `finish_reason` (`"length"`: `max_tokens` ran out; `"stop"`:
# the model wrote `<|im_end|>` or hit a stop string; `"tool_calls"`), and the `usage` in tokens. The text is
# gibberish — the weights are random — but it is a real model's greedy reply.
#
# Bad requests get an error body in OpenAI's shape and a status code that says whose fault it is — never a crash:

# %%
for bad in [{"messages": hello, "temperature": -1}, {"messages": hello, "max_tokens": 10_000},
            {"messages": hello, "model": "gpt-5"}]:  # fmt: skip
    status, text = post(bad)
    print(status, json.loads(text)["error"]["message"])

# %% [markdown]
# ## Server-sent events
#
# With `"stream": true` the reply comes as it is generated, in the **server-sent events** (SSE) format: plain text,
# one event per token, each a line `data: {json}` followed by a blank line, and a last event `data: [DONE]`.

# %%
status, text = post({"messages": hello, "max_tokens": 4, "temperature": 0, "stream": True})
print(text[:600])

# %% [markdown]
# The rules a client follows (the WHATWG spec, the part OpenAI uses): lines end with `\n`, `\r\n` or `\r`; a blank
# line ends an event; `data:` lines add to the event's data (one space after the colon is dropped, several lines
# are joined with `\n`); a line starting with `:` is a comment — servers send `: ping` to keep idle connections
# open. A loop version:

# %%
def parse_sse(text):
    events, data = [], None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "" and data is not None:  # a blank line ends the event
            joined = "\n".join(data)
            events.append(joined if joined == "[DONE]" else json.loads(joined))
            data = None
        elif line.startswith("data:"):
            data = (data or []) + [line[6:] if line.startswith("data: ") else line[5:]]
    return events

# %%
events = parse_sse(text)
print(len(events), "events; deltas:", [e["choices"][0]["delta"] for e in events[:-1]])
assert events == serve.parse_sse(text)
assert parse_sse(": ping\n\ndata:{\"a\":\ndata: 1}\r\n\r\ndata: [DONE]\n\n") == [{"a": 1}, "[DONE]"]

# %% [markdown]
# The first chunk announces the role, then one chunk per token with a `delta` — the *new* text only — then a
# chunk with the `finish_reason`, then `[DONE]`. A client prints deltas as they come; the whole message is their
# concatenation.
#
# ## The reasoning split
#
# A Qwen3 reply in thinking mode starts with `<think>`, thinks, closes with `</think>` and answers.
# `reasoning_content` gets the thinking, `content` the answer. Our tiny model never thinks on cue, so to show it we
# **steer** it: `testing.ScriptedModel` runs the real model and then adds $10^4$ to the logit of the next token of a
# script. Everything after the logits — sampling, the generation loop, the server, the parser — runs exactly as it
# would for a Qwen3 that chose those tokens itself.

# %%
def replies(prompt):
    """The script: what the steered model writes, by prompt (None: the model's own choices)."""
    if "<tool_response>" in prompt.rsplit("<|im_start|>user", 1)[-1]:
        return "<think>\nThe tool says 21.\n</think>\n\nIt is 21 °C in Paris.<|im_end|>"
    if "get_weather" in prompt:
        return ref["tools"][0]["text"]
    if "2 + 2" in prompt:
        return ref["split"][1]["text"]
    return None


steered = serve.create_app(testing.ScriptedModel(model, testing.scripted_reply(tok, replies)), tok, "tiny-qwen3")
print(ref["split"][1]["text"])

# %% [markdown]
# The picture shows that reply token by token, coloured by where each token's text goes:

# %%
def channels(pieces):
    out, mode = [], "answer"
    for piece in pieces:
        if piece in ("<think>", "</think>", "<|im_end|>"):
            out.append("tag")
            mode = {"<think>": "reasoning", "</think>": "answer"}.get(piece, mode)
        else:
            out.append(mode)
    return out


pieces = ref["split"][1]["pieces"]
colours = {"tag": "#bbbbbb", "reasoning": "#9ecae1", "answer": "#a1d99b"}
fig, ax = plt.subplots(figsize=(11, 1.6))
for i, (piece, kind) in enumerate(zip(pieces, channels(pieces))):
    ax.add_patch(plt.Rectangle((i, 0), 0.95, 1, color=colours[kind]))
    ax.text(i + 0.47, 0.5, repr(piece)[1:-1], ha="center", va="center", fontsize=7, rotation=90)
ax.set(xlim=(0, len(pieces)), ylim=(0, 1), yticks=[], xlabel="generated token",
       title="A streamed reply: grey tags, blue → reasoning_content, green → content")  # fmt: skip
plt.show()

# %% [markdown]
# As code: a state variable (`mode`) that the two tags switch, and each token's text appended to the current part.
# Two details matter. The parts are stripped of newlines at both ends, as Qwen's model card does. And the split
# is at the **first** `</think>`: the model card splits at the *last* one, but that needs the whole reply — a
# server that streams has already sent what followed the first one as answer.

# %%
def split_reply(pieces):
    parts, mode = {"reasoning": "", "answer": ""}, "answer"
    for piece in pieces:
        if piece == "<think>" and mode == "answer":
            mode = "reasoning"
        elif piece == "</think>" and mode == "reasoning":
            mode = "answer"
        elif piece not in ("<|im_end|>", "<|endoftext|>"):
            parts[mode] += piece
    return parts["reasoning"].strip("\n"), parts["answer"].strip("\n")

# %%
for case in ref["split"]:
    assert split_reply(case["pieces"]) == (case["reasoning"], case["content"]), case["name"]
    print(f"{case['name']:<40} reasoning {case['reasoning'][:28]!r:<32} answer {case['content'][:24]!r}")

# %% [markdown]
# All six replies, tokenized by the official tokenizer, split as the reference says. The one that differs from the
# model card's rule is the one whose thinking *mentions* `</think>`:

# %%
case = next(c for c in ref["split"] if c["name"] == "the thinking mentions </think>")
print("streaming rule:", split_reply(case["pieces"]))
print("model card    :", (case["model_card"]["reasoning"], case["model_card"]["content"]))

# %% [markdown]
# And the server, streaming and not: the joined deltas are exactly the message. The server sends each part **as
# generated**, newlines included, as vLLM does — `"\n"` after `<think>`, `"\n\n"` after `</think>` — so the
# model card's strip is the client's business: stripped, the parts are the reference's.

# %%
ask = [{"role": "user", "content": "What is 2 + 2?"}]
_, _, text = testing.asgi_call(steered, "POST", "/v1/chat/completions",
                          {"model": "tiny-qwen3", "messages": ask, "temperature": 0, "stream": True})  # fmt: skip
deltas = [e["choices"][0]["delta"] for e in parse_sse(text.decode())[:-1] if e["choices"]]
print([d for d in deltas if d.get("reasoning_content") or d.get("content")][:8])

# %%
streamed = ("".join(d.get("reasoning_content") or "" for d in deltas), "".join(d.get("content") or "" for d in deltas))
_, _, text = testing.asgi_call(steered, "POST", "/v1/chat/completions",
                          {"model": "tiny-qwen3", "messages": ask, "temperature": 0})  # fmt: skip
message = json.loads(text)["choices"][0]["message"]
assert streamed == (message["reasoning_content"], message["content"])
assert (streamed[0].strip("\n"), streamed[1].strip("\n")) == (ref["split"][1]["reasoning"],
                                                              ref["split"][1]["content"])  # fmt: skip
print(message)

# %% [markdown]
# ## Deltas never take back text
#
# A stop string is easy on a whole reply and subtle on a stream: `"stop": "END"` means text ending in `"EN"` must
# wait for the next token, since text that was sent is on the client's screen and cannot be taken back. The server
# **holds back** such a tail until the next token shows what it is. A streaming client that strips newlines as the
# model card does has the same problem: the reasoning above ends with `"\n\n"` before `</think>`, and on the token
# `"\n\n"` it cannot know yet whether more thinking follows (keep them) or `</think>` (drop them), so it holds back
# newlines at the end of a part. `tinyqwen.serve._Channel` does both (the server uses it without `strip`); watch
# it on the reasoning's pieces:

# %%
channel = serve._Channel(stops=["Then"], strip=True)
for piece in ["\n", "First", ",", " add", ".\n\n", "The", "n check"]:
    print(f"push {piece!r:<12} -> send {channel.push(piece)!r:<10} held back: {channel.text[channel.sent:]!r}"
          f" + newlines {channel.held!r}")  # fmt: skip
print("stopped:", channel.stopped)

# %% [markdown]
# The rule that makes a stream correct: **what was sent for the first $k$ tokens is a prefix of the final message,
# for every $k$**. The exercise checks exactly that.
#
# ## Tool calls in OpenAI's format
#
# [Chapter 9](09-chat-template-thinking.ipynb) showed how Qwen3 announces tools in the system prompt and writes
# calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. OpenAI's API wants them as objects with an
# `id`, a `type` and — a classic surprise — the arguments as a JSON **string**:

# %%
def to_openai(content):
    rest, calls = tinyqwen.parse_tool_calls(content)  # chapter 9's parser
    return rest, [{"id": f"call_{i}", "type": "function",
                   "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                  for i, c in enumerate(calls)]  # fmt: skip


case = ref["tools"][1]
print(case["content"])
print(to_openai(case["content"]))

# %% [markdown]
# While streaming, the server holds the text from `<tool_call>` on until the reply ends, parses it, and sends the
# calls in a `tool_calls` delta with `finish_reason: "tool_calls"`. (A block that does not parse is sent as plain
# text: the client sees what the model wrote.) Only requests that pass `tools` get their calls parsed.
#
# ## Assembling a streamed reply
#
# The client's side: concatenate the deltas. Tool calls arrive as pieces keyed by `index` — OpenAI's own server
# streams the arguments a few characters at a time — so a client appends each piece to its call:

# %%
def assemble(events):
    message, calls, finish = {"content": "", "reasoning_content": ""}, {}, None
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"]
            for key in ("content", "reasoning_content"):
                message[key] += delta.get(key) or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"id": piece.get("id"), "type": "function",
                                                         "function": {"name": "", "arguments": ""}})  # fmt: skip
                call["function"]["name"] += piece["function"].get("name") or ""
                call["function"]["arguments"] += piece["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return message | {"tool_calls": [calls[i] for i in sorted(calls)]}, finish

# %%
weather = ref["weather_schema"]
conversation = ref["follow_up"]["messages"][:2]
_, _, text = testing.asgi_call(steered, "POST", "/v1/chat/completions", {"model": "tiny-qwen3", "messages": conversation,
                          "tools": [weather], "temperature": 0, "stream": True})  # fmt: skip
reply, finish = assemble(parse_sse(text.decode())[:-1])
print(finish, json.dumps(reply, indent=1))

# %% [markdown]
# ## A tool-call round trip
#
# The model asked for `get_weather(city="Paris")`. The *client* runs it — the model never runs code — and sends
# the result back as a `role: "tool"` message after the assistant's call. The chat template wraps it in
# `<tool_response>` inside a user turn, and the model answers from it.

# %%
def get_weather(city):
    return {"city": city, "celsius": 21}  # a small local "tool"


call = reply["tool_calls"][0]
result = get_weather(**json.loads(call["function"]["arguments"]))
follow_up = [*conversation, {"role": "assistant", "content": "", "tool_calls": reply["tool_calls"]},
             {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}]  # fmt: skip
_, _, text = testing.asgi_call(steered, "POST", "/v1/chat/completions", {"model": "tiny-qwen3", "messages": follow_up,
                          "tools": [weather], "temperature": 0, "return_token_ids": True})  # fmt: skip
second = json.loads(text)
print(second["choices"][0]["message"])

# %% [markdown]
# The prompt of the second request, as the server built it (`return_token_ids` is vLLM's switch to get the ids
# back): the assistant's call as the template writes it, and the result as a `<tool_response>`.

# %%
prompt = tok.decode(second["prompt_token_ids"])
print(prompt[prompt.index("<|im_start|>user"):])

# %% [markdown]
# The server builds that prompt with the **injection-safe** path of [chapter 9](09-chat-template-thinking.ipynb):
# text from a message (or from a web page a tool fetched) that spells `<|im_end|>` stays plain text, so it cannot
# close its turn and write one for the system.
#
# ## Several clients at once
#
# Six clients send their requests at the same moment. The server's worker runs a **scheduler** (next section):
# every step it runs one forward pass for *all* the running requests together, so the six replies are generated
# side by side, each one's ids still exactly `tinyqwen.generate`'s for its prompt. Here is when each was in the
# queue, and when it was generating:

# %%
async def six_clients():
    bodies = [{"model": "tiny-qwen3", "messages": [{"role": "user", "content": f"Client {i}"}],
               "max_tokens": 8 + 4 * i, "temperature": 0, "stream": True} for i in range(6)]  # fmt: skip
    return await asyncio.gather(*(testing.asgi_request(app, "POST", "/v1/chat/completions",
                                                     json.dumps(b).encode()) for b in bodies))  # fmt: skip


engine = app.state.service.engine
engine.records.clear()
answers = testing.run_sync(six_clients())  # asyncio.run, also inside Jupyter's own event loop
print([status for status, _, _ in answers], [r.completion_tokens for r in engine.records])

# %%
t0 = min(r.submitted for r in engine.records)
fig, ax = plt.subplots(figsize=(8, 2.6))
for i, r in enumerate(engine.records):
    ax.barh(i, (r.started - r.submitted) * 1e3, left=(r.submitted - t0) * 1e3, color="#dddddd",
            label="waiting in the queue" if i == 0 else None)  # fmt: skip
    ax.barh(i, (r.finished - r.started) * 1e3, left=(r.started - t0) * 1e3, color="#6baed6",
            label="generating" if i == 0 else None)  # fmt: skip
ax.set(xlabel="time since the first request arrived (ms)", ylabel="request (in order finished)",
       title="Six requests sent at once, generated side by side")  # fmt: skip
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# The bars overlap: the requests share the steps. A client that **disconnects** mid-stream (the user pressed
# Stop) must not keep using the machine: the server marks its request cancelled, and the scheduler drops it at the
# next step and frees its memory. `tests/test_serve.py` tests it with a real socket that hangs up after two tokens.
#
# ## Serving many users: continuous batching
#
# Decoding one token of one sequence reads **every weight once** and does two flops per weight: on a CPU (or a
# GPU) that is limited by memory bandwidth, not arithmetic ([chapter 10](10-numba.ipynb)'s roofline). Decoding
# one token for each of B sequences in the *same* forward pass reads the weights once too, and does 2·B flops per
# weight: until B is large enough to make the step compute-bound, the extra sequences are nearly free. A server
# that runs one request at a time leaves that on the table; vLLM, SGLang and llama.cpp's server all **batch every
# running sequence into each decode step**. "Continuous": the batch is not fixed — a request joins at any step
# boundary and leaves the moment it is done, instead of the whole batch waiting for its slowest member.
#
# First, the claim measured: one decode step for B sequences of this chapter's tiny model (its cost is mostly the
# 151,936 × 32 `lm_head`: 19 MB of float32 read per step), B from 1 to 64.

# %%
import time  # noqa: E402

import numpy as np  # noqa: E402

from tinyqwen.kv_cache import RaggedKVCache  # noqa: E402


def decode_step_seconds(model, batch: int, context: int = 64, repeats: int = 9) -> float:
    """Best-of-`repeats` time of one decode step for `batch` sequences, each `context` positions in."""
    cache = model.new_cache(batch, context + repeats + 1)
    rows = RaggedKVCache(cache, np.full(batch, context))  # rows at their own lengths (here all equal)
    ids = np.ones((batch, 1), dtype=np.int64)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.forward(ids, cache=rows, last_only=True)
        best = min(best, time.perf_counter() - t)
    return best


batches = [1, 2, 4, 8, 16, 32, 64]
step = [decode_step_seconds(model, b) for b in batches]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
a1.plot(batches, [s * 1e3 for s in step], "o-")
a1.set(xscale="log", xlabel="sequences in the decode step (B)", ylabel="ms per step", ylim=(0, None),
       title="one decode step")  # fmt: skip
a2.plot(batches, [b / s for b, s in zip(batches, step, strict=True)], "o-", color="C1")
a2.set(xscale="log", yscale="log", xlabel="sequences in the decode step (B)", ylabel="tokens / s (all sequences)",
       title="aggregate throughput")  # fmt: skip
plt.show()
print(f"B=16 costs {step[4] / step[0]:.1f}× the time of B=1 and makes {16 * step[0] / step[4]:.1f}× the tokens")

# %% [markdown]
# (Timings on a shared machine move from run to run; the shape is what matters.) The step time stays nearly flat
# while the weights' bytes dominate, then grows once the arithmetic does: on 2 CPU cores the 0.6B model's 16-row
# step is about there (`benchmarks/bench_serve.py` measures the whole server).
#
# **Each row is still its own sequence.** The sequences in a step have different lengths, so each row needs its
# own position (for RoPE) and must see only its own keys. `tinyqwen.kv_cache.RaggedKVCache` is a window on the
# first B rows of one big KV cache with one length per row; given one, `Qwen3.forward` builds each row's positions
# (`lengths[b]`, `lengths[b] + 1`, ...) and a mask that lets new position t of row b see keys 0 … lengths[b] + t
# of that row. Nothing else in the model changes, on any backend. The only difference from a lone run is the
# float32 rounding of a product over B rows instead of one: `tests/test_batching.py` checks every row's logits
# against its lone run (1e-5 of their size) while sequences join and leave, on the numpy and numba backends.
#
# **A step's timeline.** New requests also need their prompt *prefilled* — a forward over hundreds of tokens,
# which is compute-bound and takes as long as many decode steps. Run a long prompt in one go and every running
# stream stalls for that long. So the scheduler prefills at most `prefill_chunk` prompt tokens per step (a long
# prompt spreads over several steps, its KV row filling up chunk by chunk), then runs the batched decode. Short
# prompts that fit in one step's budget together are prefilled *together*, in one forward over their rows (a
# ragged batch again, every row at its own length; a forward's rows all take the same number of tokens, so the
# shorter prompts are padded at the end — their pads' keys land past their length, masked and later overwritten,
# and each row's logits are read after its own last token), so ten short prompts cost one read of the weights,
# not ten:
#
# ```
# step   prefill (≤ prefill_chunk tokens)         decode (one forward, one row per running sequence)
#  1     request 0: prompt 0–15 → first token     request 0
#  2     request 1: prompt 0–15 (of 40)           request 0
#  3     request 1: prompt 16–31                  request 0
#  4     request 1: prompt 32–39 → first token    request 0, request 1
#        request 2: prompt 0–7
# ```
#
# Here is the real scheduler (`tinyqwen.serve.engine.Engine`) driven by hand, one `step()` at a time, with a
# prefill chunk of 16 tokens and a wrapper that logs what each forward pass was given:

# %%
from tinyqwen.serve.engine import Engine, Job  # noqa: E402
from tinyqwen.serve.reply_parser import ReplyParser  # noqa: E402


class Logged:
    """The model, logging each forward: ("prefill", "tokens" or "rows×tokens") or ("decode", rows)."""

    def __init__(self, model):
        self.model, self.config, self.generation_config, self.log = model, model.config, model.generation_config, []

    def new_cache(self, *args):
        return self.model.new_cache(*args)

    def forward(self, ids, *, cache, **kwargs):
        rows, T = ids.shape
        first = cache.sequences[0]  # the scheduler's caches say which requests are in their rows
        prefill = first.prefilled < len(first.prompt)
        self.log.append(("prefill", f"{rows}×{T}" if rows > 1 else str(T)) if prefill else ("decode", rows))
        return self.model.forward(ids, cache=cache, **kwargs)


logged = Logged(model)
scheduler = Engine(logged, tok, max_batch=4, prefill_chunk=16)
prompts = [[1000 + i] * n for i, n in enumerate((12, 40, 3, 5, 30))]
jobs = [Job(p, 6, {"eos_token_ids": ()}, ReplyParser(tok, (), (), tools=False)) for p in prompts]
for job in jobs:  # all five arrive at once (no thread: we call the scheduler's steps ourselves)
    scheduler._admit(job)
for n in range(1, 100):
    if not (scheduler.waiting or scheduler.active):
        break
    logged.log.clear()
    scheduler.step()
    prefill = " + ".join(t for kind, t in logged.log if kind == "prefill")
    rows = [b for kind, b in logged.log if kind == "decode"]
    print(f"step {n:2d}: prefill {prefill or '-':>9} tokens | decode {rows[0] if rows else 0} rows | "
          f"running {scheduler.active}, waiting {len(scheduler.waiting)}")
assert all(job.output_ids == tinyqwen.generate(model, p, 6, eos_token_ids=()) for job, p in zip(jobs, prompts, strict=True))
print("every reply equals generate alone")

# %% [markdown]
# Four rows (`max_batch=4`): the fifth request waits until a row is free, then takes it at once. A prefill entry
# "2×5" is one forward over two prompts' rows, 5 tokens each (the 3- and 5-token prompts fit in one step
# together; the 3-token one padded with two copies of its last token); "12 + 4" is two forwards (the 40-token prompt does not fit beside the 12-token one, so it goes alone,
# 16 tokens a step). The prefill chunk
# is the knob between the two latencies a user feels: a large chunk gives new requests their first token sooner
# (time to first token, TTFT), a small one keeps the running streams' inter-token latency (ITL) even.
#
# `Logged` only has `forward`, so here each step is two forwards: the chunk, then the decode. Given the model
# itself, the scheduler goes one step further, as vLLM's chunked prefill and llama.cpp's server do: the chunk's
# tokens and the decode rows are stacked into ONE forward (`tinyqwen/serve/mixed_forward.py`: every product runs on
# all their rows, RoPE, the KV writes and attention group by group), so a step costs one pass over the weights and
# the running streams wait only for the chunk's share of it.
#
# **KV memory.** Every running sequence needs its keys and values: 2 · layers · kv heads · head_dim · 4 bytes per
# position (float32), 224 KiB per token for Qwen3-0.6B — a 40,960-token context is 8.75 GiB for *one* sequence.
# So the server is given a **budget** (`--kv-budget`, default: room for the whole context in every row, at most a
# quarter of the free memory) and allocates it once, at start-up, as `max_batch` rows of `slot_len` positions:
# **per-sequence slots** (`tinyqwen/serve/kv_pool.py`). A running sequence owns one row; when it finishes, is
# cancelled or its client disconnects, the row is free at once, and the last running row moves into the hole so
# the running rows stay packed at the front — then one decode step reads `cache[:B]`, a view, with no gathering.
# A request that finds every row taken waits in the queue; past `--max-queue` waiting requests, new ones get
# `429 Too Many Requests` with a `Retry-After` header. The server never allocates beyond its budget, so it does not
# run out of memory under load.
#
# vLLM chose differently: **paged** KV memory (PagedAttention), fixed-size blocks of e.g. 16 positions handed out
# as a sequence grows, like virtual memory pages. A sequence then uses memory only for the positions it has, and
# no request is limited to a fixed `slot_len`; the price is that attention must follow each sequence's block
# table (a custom kernel; in NumPy, a gather — a copy of every running sequence's keys in every layer at every
# step). Slots keep the existing attention kernels and cost nothing per step; their price is a per-request limit
# of `slot_len` positions, prompt and reply together (shown at start-up; `max_tokens` is cut to fit, and a longer
# prompt is refused with a 400 that names the limit).

# %%
from tinyqwen.config import published_configs  # noqa: E402
from tinyqwen.serve.kv_pool import pool_shape  # noqa: E402

qwen06 = published_configs()["Qwen3-0.6B"]
for budget_gib in (2, 8, 32):
    rows, slot_len = pool_shape(qwen06, budget_gib << 30, 16)
    print(f"Qwen3-0.6B, --kv-budget {budget_gib}GiB, --max-batch 16: {rows} rows of {slot_len:,} positions")

# %% [markdown]
# `tinyqwen serve` says its choice when it starts, and reports how it is doing at `GET /metrics` in Prometheus'
# text format (requests, running sequences, queue length, tokens/s, TTFT and inter-token histograms) and
# `GET /health`:

# %%
_, _, text = testing.asgi_call(app, "GET", "/metrics")
print("\n".join(line for line in text.decode().splitlines() if not line.startswith("#"))[:1500])

# %% [markdown]
# **One thread computes, another talks.** The scheduler runs its steps in its own thread; the HTTP side (uvicorn's
# event loop: reading requests, writing each stream's events) runs in the main one. In Python only one thread runs
# Python code at a time (the GIL), so a step that held the GIL for its whole length would make every stream's next
# event wait for the step to end. NumPy's BLAS releases the GIL while it multiplies, and the numba backend's kernels
# are compiled with `nogil=True`, so they release it too (`tests/test_numba_nogil.py` checks that another thread
# keeps running during each of them). Measured with 16 streaming clients on 2 cores, the event loop used about 1 %
# of the server's CPU time and the model's threads the other 99 %: the GIL was never what limited throughput there,
# but a kernel that held it would have added its full length to the latency of every event in the queue behind it.

# %% [markdown]
# With a real checkpoint, the same server is one command away, and any OpenAI client talks to it:
#
# ```bash
# tinyqwen serve --model Qwen/Qwen3-0.6B --port 8000
# ```
# ```python
# from openai import OpenAI
# client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
# r = client.chat.completions.create(model="Qwen/Qwen3-0.6B", messages=[{"role": "user", "content": "Hi /no_think"}])
# print(r.choices[0].message.reasoning_content, r.choices[0].message.content)
# ```

# %%
from tinyqwen.hub import official_checkpoint  # noqa: E402

path = official_checkpoint()
if path is None:
    print("No official checkpoint here (set $TINYQWEN_MODEL to use one); this chapter runs on the tiny model.")
else:
    real = serve.create_app(tinyqwen.load_model(path), tinyqwen.Tokenizer.from_pretrained(path), "qwen3")
    _, _, text = testing.asgi_call(real, "POST", "/v1/chat/completions", {"model": "qwen3", "max_tokens": 200,
                              "messages": [{"role": "user", "content": "Is 97 prime?"}], "temperature": 0})  # fmt: skip
    print(json.loads(text)["choices"][0]["message"])

# %% [markdown]
# ## Your client against the real server
#
# Last, the whole path against the official implementations: chapter 9's conversation, sent over the server's
# HTTP interface with thinking off and greedy decoding, streamed, parsed and assembled by the client code of this
# chapter. Its ids must equal transformers' greedy `generate` on the same checkpoint, and the round trip's prompt
# must equal the official chat template's, tokenized by the official tokenizer.

# %%
e = ch09["end_to_end"]
body = {"model": "tiny-qwen3", "messages": e["messages"], "max_tokens": e["max_new_tokens"], "temperature": 0,
        "stream": True, "chat_template_kwargs": {"enable_thinking": False}, "return_token_ids": True}  # fmt: skip
_, _, text = testing.asgi_call(app, "POST", "/v1/chat/completions", body)
events = parse_sse(text.decode())
message, finish = assemble(events[:-1])
assert events[-2]["choices"][0]["token_ids"] == e["new_ids"], "the server's ids vs transformers' generate"
assert message["content"] == e["text"].strip("\n") and message["reasoning_content"] == "", "the assembled reply"
assert second["prompt_token_ids"] == ref["follow_up"]["ids"], "the round trip's prompt vs the official template"
print(f"{len(e['new_ids'])} streamed greedy ids equal transformers' generate; the tool round trip's prompt "
      f"({len(ref['follow_up']['ids'])} ids) equals the official template + tokenizer "
      f"(transformers {ref['transformers_version']})")

# %% [markdown]
# ## Summary
#
# - An OpenAI-compatible server is the model behind a small JSON contract: `/v1/models`, `/v1/chat/completions`,
#   `/v1/completions`; OpenAI-style error bodies with honest status codes.
# - Streaming is server-sent events: `data: {json}` and a blank line per token, `data: [DONE]` at the end.
# - Qwen3's thinking is split off token by token — at the first `</think>`, because a stream cannot take text back
#   — and every delta is held back just long enough to be final (trailing newlines, partial stop strings).
# - Tool calls leave as OpenAI objects with JSON-string arguments; clients assemble them from pieces, run the tool,
#   and send the result back as a `tool` message.
# - Continuous batching: one decode step for every running sequence (the weights read once), prompts prefilled in
#   chunks inside those steps, KV memory from a fixed budget of per-sequence rows freed the moment a request ends;
#   each reply is still what it would be alone.
#
# ## Exercises
#
# Open `exercises/ch12_serving.py` and fill in `parse_sse`, `split_deltas`, `parse_tool_calls`, `assemble`,
# `follow_up` and `scheduler_step` (one step of a continuous-batching scheduler, graded on a scripted model), then
# run
#
# ```bash
# pytest exercises/test_ch12_serving.py
# ```
#
# The last checkpoint points **your client** at tinyqwen's real server and checks the reply against transformers
# and the round trip's prompt against the official template.
