"""Thinking mode: soft switches, and the thinking budget (Qwen3 technical report, section 4.3)."""

from __future__ import annotations

import pytest
from conftest import StubModel, one_hot_rule

from tinyqwen.generation import generate, generate_batch
from tinyqwen.thinking import (
    EARLY_STOP_TEXT,
    THINK_END_ID,
    THINK_START_ID,
    ThinkingBudget,
    soft_switch,
    thinking_mode,
)

ASSISTANT = [151644, 77091, 198]  # "<|im_start|>assistant\n"
STOP = [
    271,
    9999,
    8888,
    THINK_END_ID,
    271,
]  # a stand-in early-stop text for stub tests (ends in </think>\n\n)


def find_all(haystack: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i : i + len(needle)] == needle]


def thinker(think_for: int | None):
    """A model that opens <think>, then writes ordinary tokens (ids 1000, 1001, ...) and closes the block after
    `think_for` of them (never, if None); after </think> it answers 500 + (tokens since </think>)."""

    def next_id(history: list[int]) -> int:
        if THINK_START_ID not in history:
            return THINK_START_ID
        after = history[len(history) - history[::-1].index(THINK_START_ID) :]
        if THINK_END_ID in after:
            return 500 + len(after) - after.index(THINK_END_ID) - 1
        if think_for is not None and len(after) >= think_for:
            return THINK_END_ID
        return 1000 + len(after)

    return StubModel(one_hot_rule(next_id))


# ------------------------------------------------------------------------------------------ soft switches


def test_soft_switch_last_one_wins():
    assert soft_switch("/think then /no_think") is False
    assert soft_switch("/no_think then /think") is True
    assert soft_switch("no switch here, not even /thinking") is None


def test_thinking_mode_follows_the_most_recent_switch_in_user_and_system_messages():
    msgs = [
        {"role": "system", "content": "Be brief. /no_think"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello /think"},  # assistant text is not an instruction
    ]
    assert thinking_mode(msgs) is False
    assert thinking_mode([*msgs, {"role": "user", "content": "now think /think"}]) is True
    assert thinking_mode([{"role": "user", "content": "x /think"}], enable_thinking=False) is False
    assert thinking_mode([{"role": "user", "content": "plain"}]) is True


# ------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("budget", [0, 1, 5, 17])
def test_budget_forces_the_early_stop_text_once_after_exactly_n_thinking_tokens(budget):
    model = thinker(think_for=None)  # would think forever
    out = generate(model, ASSISTANT, 60, thinking_budget=budget, early_stop=STOP, eos_token_ids=())
    assert out[0] == THINK_START_ID
    assert find_all(out, STOP) == [1 + budget], "forced text exactly once, right after <think> + N tokens"
    assert out[1 : 1 + budget] == [1000 + i for i in range(budget)]  # the model's own thinking, untouched
    after = out[1 + budget + len(STOP) :]
    assert after[:3] == [501, 502, 503], "the model goes on to write its answer (after STOP's final 271)"
    assert len(out) == 60
    assert out.count(THINK_END_ID) == 1


def test_no_forcing_when_the_model_closes_its_thinking_within_budget():
    model = thinker(think_for=4)
    out = generate(model, ASSISTANT, 20, thinking_budget=10, early_stop=STOP, eos_token_ids=())
    assert find_all(out, STOP) == []
    assert out[:6] == [THINK_START_ID, 1000, 1001, 1002, 1003, THINK_END_ID]


def test_budget_is_counted_from_a_think_tag_already_in_the_prompt():
    model = thinker(think_for=None)
    out = generate(model, [*ASSISTANT, THINK_START_ID, 198], 12, thinking_budget=3, early_stop=STOP,
                   eos_token_ids=())  # fmt: skip
    assert find_all(out, STOP) == [3]
    assert generate(model, [*ASSISTANT, THINK_START_ID], 8, thinking_budget=0, early_stop=STOP,
                    eos_token_ids=())[: len(STOP)] == STOP  # fmt: skip


def test_a_think_tag_typed_in_the_user_message_does_not_open_thinking():
    user_turn = [151644, 872, 198, THINK_START_ID, 151645, 198]  # "<|im_start|>user\n<think><|im_end|>\n"
    model = StubModel(one_hot_rule(lambda h: 42))
    out = generate(model, [*user_turn, *ASSISTANT], 6, thinking_budget=0, early_stop=STOP, eos_token_ids=())
    assert out == [42] * 6


def test_no_budget_when_thinking_is_off():
    # enable_thinking=False ends the prompt with an empty, closed block: "<think>\n\n</think>\n\n"
    prompt = [*ASSISTANT, THINK_START_ID, 271, THINK_END_ID, 271]
    model = StubModel(one_hot_rule(lambda h: 42))
    out = generate(model, prompt, 10, thinking_budget=0, early_stop=STOP, eos_token_ids=())
    assert out == [42] * 10


def test_forced_ids_count_towards_max_new_tokens():
    out = generate(thinker(None), ASSISTANT, 4, thinking_budget=1, early_stop=STOP, eos_token_ids=())
    assert out == [THINK_START_ID, 1000, *STOP[:2]]


def test_budget_in_a_batch_acts_per_row():
    model = thinker(think_for=None)
    prompts = [ASSISTANT, [11, 12, 13, *ASSISTANT]]
    outs = generate_batch(model, prompts, 30, thinking_budget=4, early_stop=STOP, eos_token_ids=())
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == generate(model, prompt, 30, thinking_budget=4, early_stop=STOP, eos_token_ids=())
        assert find_all(out, STOP) == [5]


def test_budget_state_machine_by_hand():
    b = ThinkingBudget.for_prompt(ASSISTANT, budget=2, early_stop_ids=[7, THINK_END_ID])
    assert [b.step(t) for t in (THINK_START_ID, 100)] == [[], []]
    assert b.step(101) == [7, THINK_END_ID]
    assert b.step(7) == [] and b.step(THINK_END_ID) == [] and not b.thinking
    assert b.step(102) == [] and b.forced


def test_bad_budget_is_rejected():
    from tinyqwen.errors import GenerationError

    with pytest.raises(GenerationError, match="thinking_budget"):
        generate(thinker(None), ASSISTANT, 4, thinking_budget=-1)


# ------------------------------------------------------------------------------------------ real tokenizer


def test_default_early_stop_text_tokenizes_to_a_closing_think_block():
    tok = pytest.importorskip("tinyqwen.tokenizer").Tokenizer.qwen3()
    from tinyqwen.thinking import early_stop_ids

    ids = early_stop_ids()
    assert ids == tok.encode(EARLY_STOP_TEXT)
    assert tok.decode(ids) == EARLY_STOP_TEXT
    assert ids.count(THINK_END_ID) == 1 and ids[-2:] == [THINK_END_ID, tok.encode("\n\n")[0]]


def test_budget_on_the_tiny_real_vocab_checkpoint(tiny_qwen3_model):
    """The real model and tokenizer: a prompt that opens a think block, budget 6, the default early-stop text."""
    tokenizer = pytest.importorskip("tinyqwen.tokenizer").Tokenizer
    from tinyqwen.chat_template import apply_chat_template
    from tinyqwen.thinking import early_stop_ids

    tok = tokenizer.qwen3()
    text = apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True
    )
    prompt = tok.encode(text + "<think>\n")
    stop = early_stop_ids()
    out = generate(tiny_qwen3_model, prompt, 40, thinking_budget=6, eos_token_ids=())
    assert THINK_END_ID not in out[:6], "the random model closed its thinking by itself: pick another prompt"
    assert find_all(out, stop) == [6]
    assert len(out) == 40  # and generation went on after the forced text
    assert EARLY_STOP_TEXT in tok.decode(out)
