"""Chapter 9 solutions: thin adapters over tinyqwen's own code (solutions mode grades tinyqwen itself)."""

from __future__ import annotations

from collections.abc import Sequence

from tinyqwen import chat_parsing
from tinyqwen.chat_template import apply_chat_template

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
EMPTY_THINK = "<think>\n\n</think>\n\n"


def render_chat(
    messages: Sequence[dict], add_generation_prompt: bool = False, enable_thinking: bool = True
) -> str:
    return apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )


def split_thinking(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    # tinyqwen drops the <think>/</think> tags from the thinking; the model card keeps them: cut where its content starts
    ids = [int(i) for i in ids]
    _, content = chat_parsing.split_thinking(ids)
    index = len(ids) - len(content)
    return ids[:index], ids[index:]


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    content, calls = chat_parsing.parse_tool_calls(text)
    return content, [{"name": call.name, "arguments": call.arguments} for call in calls]
