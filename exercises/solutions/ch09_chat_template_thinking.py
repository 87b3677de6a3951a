"""Chapter 9 solutions: the Qwen3 chat template (system, user, assistant; no tools), splitting the thinking off,
and reading tool calls, written out (tinyqwen/chat_template.py and chat_parsing.py are the library's versions,
with tools and every input check)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _reasoning_and_content(message: dict) -> tuple[str, str]:
    content = message.get("content") or ""
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content
    if "</think>" not in content:
        return "", content
    # the template's own string operations: reasoning up to the FIRST </think>, content after the LAST one
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def render_chat(
    messages: Sequence[dict], add_generation_prompt: bool = False, enable_thinking: bool = True
) -> str:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_query = users[-1] if users else len(messages) - 1  # none: no assistant turn counts as "after" it
    text = ""
    for i, message in enumerate(messages):
        role = message["role"]
        if role in ("system", "user"):
            text += f"<|im_start|>{role}\n{message.get('content') or ''}<|im_end|>\n"
        elif role == "assistant":
            reasoning, content = _reasoning_and_content(message)
            # only the turns after the last question keep their thinking: earlier thoughts are dropped
            if i > last_query and (i == len(messages) - 1 or reasoning):
                text += f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
            else:
                text += f"<|im_start|>assistant\n{content}"
            text += "<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
        if not enable_thinking:
            text += EMPTY_THINK  # thinking off = an empty think block already written for the model
    return text


def split_thinking(ids: Sequence[int]) -> tuple[list[int], list[int]]:  # [T] -> [index], [T - index]
    ids = [int(i) for i in ids]
    if THINK_END_ID not in ids:
        return [], ids
    index = len(ids) - ids[::-1].index(THINK_END_ID)  # just after the LAST </think>, as the model card does
    return ids[:index], ids[index:]


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    calls = []
    for body in _TOOL_CALL.findall(text):
        call = json.loads(body.strip())
        arguments = call["arguments"]
        if isinstance(arguments, str):  # the OpenAI wire format sends the arguments as a JSON string
            arguments = json.loads(arguments)
        calls.append({"name": call["name"], "arguments": arguments})
    content = _TOOL_CALL.sub("", text).strip("\n")  # the text outside the blocks, joined
    return content, calls
