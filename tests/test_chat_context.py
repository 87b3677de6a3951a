"""`tinyqwen chat` when the conversation outgrows the context, `--kv-dtype`, and `tinyqwen info --context N`.

Chat's policy (the rule in `tinyqwen.chat_context`, the REPL in `tinyqwen.cli.chat.cmd_chat`): after each reply it
prints how many tokens the conversation uses and how many are left; when a new message would not leave room for a
reply, the oldest exchanges are dropped (system message kept) with a notice; a single message that cannot fit at all
is refused.
"""

from __future__ import annotations

import shutil

from test_cli import IM_END, assert_one_line_error, run_chat, stub, tinyqwen

from tinyqwen.config import CONFIG_DIR
from tinyqwen.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon"


def reply_of(n: int):
    return lambda turn, generated: 9707 if len(generated) < n else IM_END  # "Hello" n times, then <|im_end|>


def test_chat_reports_tokens_left_after_each_reply(monkeypatch, capsys, stub_model_factory):
    model = stub(stub_model_factory, reply_of(3), max_position_embeddings=4096)
    code, out, prompts = run_chat(monkeypatch, capsys, model, ["Hi", "Again"], "--no-think")
    assert code == 0
    status = [line for line in out.out.splitlines() if line.startswith("[context: ") and "left]" in line]
    assert len(status) == 2
    for line, prompt in zip(status, prompts, strict=True):
        used = len(prompt) + 4  # 3 x "Hello" + <|im_end|>
        assert line == f"[context: {used:,} of 4,096 tokens used, {4096 - used:,} left]"


def test_chat_drops_the_oldest_exchanges_when_the_history_no_longer_fits(
    monkeypatch, capsys, stub_model_factory
):
    # --context 200 and --max-new-tokens 6: a prompt must leave 6 tokens free. Each user message is ~25 tokens, each
    # exchange ~40 with the template and the reply: by the fifth message the oldest exchanges must go.
    model = stub(stub_model_factory, reply_of(3), max_position_embeddings=4096)
    lines = [f"message {i}: {WORDS}" for i in range(1, 7)]
    code, out, prompts = run_chat(
        monkeypatch, capsys, model, lines, "--no-think", "--system", "Be kind.", "--context", "200"
    )
    assert code == 0 and len(prompts) == 6, out.err
    tok = Tokenizer.qwen3()
    assert all(len(p) + 6 <= 200 for p in prompts)
    notices = [line for line in out.out.splitlines() if "dropped the oldest" in line]
    assert notices, out.out
    last = tok.decode(prompts[-1])
    assert last.startswith("<|im_start|>system\nBe kind.<|im_end|>")  # the system message stays
    assert "message 6:" in last and "message 1:" not in last
    # what was kept is the most recent history, whole exchanges, in order
    kept = [i for i in range(1, 7) if f"message {i}:" in last]
    assert kept == list(range(kept[0], 7)) and last.count("<|im_start|>user") == len(kept)
    # each notice says how many exchanges went and how long the prompt now is
    assert all(
        line.startswith("[context: dropped the oldest ") and "of 200 tokens]" in line for line in notices
    )


def test_chat_refuses_a_message_that_cannot_fit_even_alone(monkeypatch, capsys, stub_model_factory):
    model = stub(stub_model_factory, reply_of(1), max_position_embeddings=4096)
    code, out, prompts = run_chat(monkeypatch, capsys, model, ["Hi", WORDS * 4, "Bye"], "--context", "60")
    assert code == 0 and len(prompts) == 2
    errors = [line for line in out.err.splitlines() if line.startswith("tinyqwen: error")]
    assert len(errors) == 1 and "not sent" in errors[0] and "context is 60" in errors[0]


def test_fit_to_context_keeps_system_messages_and_leaves_the_input_alone():
    from tinyqwen.chat_context import fit_to_context

    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]  # fmt: skip
    new = {"role": "user", "content": "u3"}
    render = lambda messages: list(range(10 * len(messages)))  # noqa: E731  (10 tokens a message)
    kept, ids, dropped = fit_to_context(history, new, render, context=30, room=5)
    assert [m["content"] for m in kept] == ["s"] and len(ids) == 20 and dropped == 2
    assert len(history) == 4  # the caller's history is only replaced, never changed in place
    # fits already: nothing dropped, the prompt rendered once
    assert fit_to_context(history, new, render, context=100, room=5) == (history, list(range(50)), 0)
    # nothing left to drop: the prompt comes back too long, for the caller to refuse
    kept, ids, dropped = fit_to_context(history, new, render, context=15, room=5)
    assert kept == history[:1] and len(ids) == 20 and dropped == 2


def test_kv_dtype_flag(tiny_qwen3_dir):
    run = tinyqwen("generate", "--model", str(tiny_qwen3_dir), "--raw", "--temperature", "0",
                   "--max-new-tokens", "3", "--kv-dtype", "bfloat16", "--json", "Hello")  # fmt: skip
    assert run.returncode == 0, run.stderr
    bad = tinyqwen("generate", "--model", str(tiny_qwen3_dir), "--kv-dtype", "int8", "Hello")
    assert bad.returncode == 2 and "invalid choice: 'int8'" in bad.stderr


def test_info_context_prints_memory_per_cache_dtype(tmp_path):
    # Qwen3-0.6B at 32,768 tokens, by hand: KV cache 2 · 28 layers · 8 kv heads · 128 · 32768 positions
    # = 1,879,048,192 values: 7.0 GiB in float32, 3.5 GiB in bfloat16/float16; weights 596,049,920 · 4 B = 2.2 GiB
    shutil.copy(CONFIG_DIR / "Qwen3-0.6B.json", tmp_path / "config.json")
    run = tinyqwen("info", "--model", str(tmp_path), "--context", "32768")
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.startswith("  ")}
    assert rows["float32"][1:5] == ["2.2", "GiB", "7.0", "GiB"]
    assert rows["bfloat16"][1:5] == ["2.2", "GiB", "3.5", "GiB"] and rows["float16"][3:5] == ["3.5", "GiB"]
    assert "32,768-token context" in run.stdout
    assert_one_line_error(tinyqwen("info", "--model", str(tmp_path), "--context", "0"), "--context must be")
