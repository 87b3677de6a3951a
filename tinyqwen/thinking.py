"""Thinking mode: the `<think>` block, the soft switches, and a budget for how long the model thinks.

A Qwen3 reply in thinking mode looks like

    <think>\\nLet me work this out ...\\n</think>\\n\\nThe answer is 4.<|im_end|>

Three ways to steer it:
- `enable_thinking=False` in the chat template pre-fills an *empty* think block (`<think>\\n\\n</think>\\n\\n`)
  after `<|im_start|>assistant\\n`, so the model goes straight to the answer.
- The soft switches `/think` and `/no_think`, written in a user or system message, ask the model to think or
  not from that turn on; the most recent one wins. They are plain text: the template passes them through and the
  model was trained to obey. They do nothing when `enable_thinking=False` (no thinking at all then).
- A *thinking budget* (Qwen3 technical report, section 4.3): when the thinking reaches N tokens without `</think>`,
  we append an early-stop instruction that closes the block, and the model writes its answer from there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
IM_START_ID = 151644  # <|im_start|>

# The Qwen3 technical report prints this text with a stray "." after </think>; this is the form used in practice,
# and its ending "</think>\n\n" is exactly what the chat template writes after a think block.
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)

_SWITCH = re.compile(r"/(no_think|think)\b")


def soft_switch(text: str) -> bool | None:
    """The last soft switch written in `text`: True for /think, False for /no_think, None if neither.

    >>> soft_switch("explain /no_think please"), soft_switch("hi /no_think then /think"), soft_switch("hi")
    (False, True, None)
    """
    found = _SWITCH.findall(text)
    return None if not found else found[-1] == "think"


def thinking_mode(messages: Sequence[Mapping], enable_thinking: bool = True) -> bool:
    """Will the next reply think? `enable_thinking=False` always wins; otherwise the most recent soft switch in
    a user or system message decides, and with no switch the model thinks.

    >>> thinking_mode([{"role": "user", "content": "2+2? /no_think"}])
    False
    >>> thinking_mode([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi /think"}])
    True
    >>> thinking_mode([{"role": "user", "content": "hi /think"}], enable_thinking=False)
    False
    """
    if not enable_thinking:
        return False
    mode = True
    for message in messages:
        content = message.get("content")
        if message.get("role") in ("user", "system") and isinstance(content, str):
            switch = soft_switch(content)
            if switch is not None:
                mode = switch
    return mode


@dataclass
class ThinkingBudget:
    """Per-sequence state machine that enforces a thinking budget during generation.

    Feed it every new token with `step(token_id)`; it answers with the ids to force next (usually none). Thinking
    is *open* after `<think>` (in the prompt or generated) until `</think>`. Tokens generated while open are
    counted (the `<think>` marker itself is not). When the count reaches `budget` with the block still open, the
    early-stop ids are returned once: the caller feeds them in as if the model had written them, which closes
    the block (they end in `</think>\\n\\n`), and then lets the model write the answer.

    >>> b = ThinkingBudget(budget=2, early_stop_ids=[9, THINK_END_ID])
    >>> [b.step(t) for t in [THINK_START_ID, 5, 6]]
    [[], [], [9, 151668]]
    >>> b.step(9), b.step(THINK_END_ID), b.step(7), b.forced
    ([], [], [], True)
    """

    budget: int
    early_stop_ids: Sequence[int]
    thinking: bool = False
    count: int = 0
    forced: bool = False
    _forcing: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def for_prompt(cls, prompt_ids: Sequence[int], budget: int, early_stop_ids: Sequence[int]):
        """Start in the right state: a prompt that ends inside an open think block starts counting at once."""
        state = cls(budget=budget, early_stop_ids=list(early_stop_ids))
        state.thinking = _last_open(prompt_ids)
        if state.thinking and budget == 0:
            state._forcing, state.forced = list(state.early_stop_ids), True
        return state

    def pending(self) -> list[int]:
        """Ids that must be fed before the model may choose again (used right after the prompt)."""
        out, self._forcing = self._forcing, []
        return out

    def step(self, token_id: int) -> list[int]:
        if token_id == THINK_START_ID and not self.thinking:
            self.thinking, self.count = True, 0
        elif token_id == THINK_END_ID:
            self.thinking = False
        elif self.thinking:
            self.count += 1
        if self.thinking and not self.forced and self.count >= self.budget:
            self.forced = True
            return list(self.early_stop_ids)
        return []


def _last_open(ids: Sequence[int]) -> bool:
    """Does `ids` end inside a think block, opened in the last message (after the last `<|im_start|>`)?

    A `<think>` a user typed in an earlier message does not count.

    >>> _last_open([151644, 77091, 198, THINK_START_ID, 198]), _last_open([THINK_START_ID, 151644, 77091, 198])
    (True, False)
    """
    for token in reversed(list(ids)):
        if token in (THINK_END_ID, IM_START_ID):
            return False
        if token == THINK_START_ID:
            return True
    return False


def early_stop_ids(text: str = EARLY_STOP_TEXT, tokenizer=None) -> list[int]:
    """Token ids of the early-stop text (with the packaged Qwen3 tokenizer unless one is given)."""
    if tokenizer is None:
        from tinyqwen.tokenizer import Tokenizer

        tokenizer = _qwen3_tokenizer(Tokenizer)
    return list(tokenizer.encode(text))


_TOKENIZER_CACHE: dict = {}


def _qwen3_tokenizer(cls):
    if "qwen3" not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE["qwen3"] = cls.qwen3()
    return _TOKENIZER_CACHE["qwen3"]
