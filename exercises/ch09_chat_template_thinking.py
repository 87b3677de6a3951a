"""Chapter 9 exercises: the chat template and thinking.

Fill in each function, in order (notebooks/09-chat-template-thinking.ipynb builds them in the same order), then run
`pytest exercises/test_ch09_chat_template_thinking.py`. The last checkpoint runs YOUR tokenizer (chapter 1), YOUR
template (here), YOUR kernels (chapters 3-7) and YOUR generation loop (chapter 8) from a chat message to text.

Write plain Python; do not import tinyqwen here (and no Jinja: the template is yours).
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
EMPTY_THINK = "<think>\n\n</think>\n\n"


def render_chat(
    messages: Sequence[dict], add_generation_prompt: bool = False, enable_thinking: bool = True
) -> str:
    """The official Qwen3 chat template as Python, for roles "system", "user" and "assistant" (no tools).

    Each message is a dict with "role" and "content" (a string); an assistant message may also carry
    "reasoning_content" (a string). The rules:

    1. A system or user message is one ChatML turn: "<|im_start|>{role}\\n{content}<|im_end|>\\n".
    2. An assistant message's reasoning is its "reasoning_content" when given. Otherwise, if its content holds
       "</think>", the reasoning is the text between "<think>" and the first "</think>" (newlines next to the tags
       trimmed) and the content is what follows the LAST "</think>" (leading newlines trimmed).
    3. Let q be the index of the last user message. An assistant message at index i > q that is the last message
       or has a non-empty reasoning is written with its think block:
           "<|im_start|>assistant\\n<think>\\n{reasoning without outer newlines}\\n</think>\\n\\n{content}<|im_end|>\\n"
       Every other assistant message is "<|im_start|>assistant\\n{content}<|im_end|>\\n": earlier turns lose
       their reasoning.
    4. add_generation_prompt=True appends "<|im_start|>assistant\\n" — and, when enable_thinking is False, the empty
       think block EMPTY_THINK after it.

    >>> render_chat([{"role": "user", "content": "Hi!"}], add_generation_prompt=True, enable_thinking=False)
    '<|im_start|>user\\nHi!<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
    >>> render_chat([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\\nsum\\n</think>\\n\\n4"},
    ...              {"role": "user", "content": "Thanks"}])
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n<|im_start|>user\\nThanks<|im_end|>\\n'
    """
    raise NotImplementedError


def split_thinking(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split generated ids into (thinking ids, content ids) at the LAST </think> (id 151668), as Qwen's model card does.

    index = the position just after the last 151668 (0 when there is none); thinking = ids[:index] (so it holds the
    <think> and </think> tokens), content = ids[index:].   [T] -> [index], [T - index]

    >>> split_thinking([151667, 198, 11, 151668, 271, 21, 151645])
    ([151667, 198, 11, 151668], [271, 21, 151645])
    >>> split_thinking([21, 22])
    ([], [21, 22])
    """
    raise NotImplementedError


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Pull every "<tool_call>\\n{json}\\n</tool_call>" block out of a reply: (remaining content, calls in order).

    Each call is {"name": str, "arguments": dict}; when "arguments" is a JSON *string* (the OpenAI wire format),
    decode it to a dict. The content is the text outside the blocks, joined, with newlines stripped at both ends.
    You may assume every block is well formed.

    >>> parse_tool_calls('Let me check.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    ('Let me check.', [{'name': 'f', 'arguments': {'x': 1}}])
    >>> parse_tool_calls("No calls here.")
    ('No calls here.', [])
    """
    raise NotImplementedError
