"""What a new user runs into first: nothing they asked for is lost, and every mistake gets one clear line.

- ids past the tokenizer's vocabulary (a model's spare embedding rows) decode to "" instead of killing the reply;
- NaN/inf logits stop generation with the step and the first layer whose output went non-finite;
- `generate --file`: UTF-8 checked up front, bounded batches, each batch written as soon as it is done;
- bad numbers for `bench` / `verify`, ragged ids, `input_ids=`, the Hub download hint, `--version`, `--help`.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import StubModel, one_hot_rule
from test_cli import assert_one_line_error
from test_cli import tinyqwen as run_cli

import tinyqwen as tq
from tinyqwen.errors import GenerationError
from tinyqwen.testing import QWEN3_VOCAB, tiny_qwen3_config, tiny_qwen3_tensors, write_tiny_qwen3

FIXTURES = Path(__file__).parent / "fixtures"
N_TOKENS = 151669  # ids the Qwen3 tokenizer knows; the checkpoint has 151,936 embedding rows
SPARE = 151900  # a spare row: a model may choose it, the tokenizer has no token for it


@pytest.fixture(scope="module")
def tok():
    return tq.Tokenizer.qwen3()


# ------------------------------------------------------------------------------------------ spare ids


def test_ids_past_the_vocabulary_decode_to_nothing_as_in_transformers(tok):
    # transformers 5.23.0 with the official tokenizer files: decode([9707, 151669, 151900, 151935, 1879]) is
    # 'Hello world' and decode([151935]) is '' (checked by hand with AutoTokenizer; ids past the vocab are dropped)
    assert tok.decode([9707, N_TOKENS, SPARE, QWEN3_VOCAB - 1, 1879]) == "Hello world"
    assert tok.decode([QWEN3_VOCAB - 1]) == ""
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in [9707, SPARE, 1879]] + [stream.flush()] == ["Hello", "", " world", ""]
    # a spare id between the two halves of a character does not break the character
    emoji = tok.encode(" 😁")  # the emoji's 4 bytes are split over two tokens
    assert len(emoji) == 2
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in [emoji[0], SPARE, emoji[1]]) + stream.flush() == " 😁"


def test_the_chat_printer_and_answer_survive_spare_ids(tok):
    # the pieces `tinyqwen chat` prints and keeps in its history with
    from tinyqwen.cli.display import ReplyPrinter, Style, answer_text

    ids = [151667, 1986, SPARE, 151668, 9707, SPARE, 1879, 151645]  # <think>…</think> Hello world <|im_end|>
    out = io.StringIO()
    printer = ReplyPrinter(tok, Style(color=False), out, eos_ids=(151645,))
    for i in ids:
        printer.push(i)
    printer.close()
    assert out.getvalue() == f"[thinking]{tok.decode([1986])}[/thinking]Hello world\n"
    assert answer_text(tok, ids, (151645,)) == (tok.decode([1986]).strip(), "Hello world")


def write_spare_id_model(folder: Path) -> Path:
    """A tiny Qwen3 whose greedy choice is always SPARE or 9707 ('Hello'), by the sign of one hidden channel:
    lm_head is zero except those two rows, which read channel 0 with opposite signs; the two tokens' embeddings
    push channel 0 the other way, so the reply alternates between them."""
    from safetensors.numpy import save_file

    write_tiny_qwen3(folder, tie_word_embeddings=False)
    config = tiny_qwen3_config(tie_word_embeddings=False)
    tensors = tiny_qwen3_tensors(config)
    head = np.zeros((QWEN3_VOCAB, config["hidden_size"]), np.float32)
    head[SPARE, 0], head[9707, 0] = 50.0, -50.0
    tensors["model.embed_tokens.weight"][[SPARE, 9707], 0] = -20.0, 20.0
    tensors["lm_head.weight"] = head
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def spare_id_model_dir(tmp_path_factory):
    return write_spare_id_model(tmp_path_factory.mktemp("spare") / "spare-ids")


def test_generate_streams_and_batches_replies_holding_spare_ids(spare_id_model_dir, tok, tmp_path):
    args = ["--model", str(spare_id_model_dir), "--temperature", "0", "--max-new-tokens", "12", "--raw"]
    ids = tq.generate(tq.load_model(spare_id_model_dir), tok.encode("Hi"), 12)
    assert SPARE in ids and 9707 in ids  # the model really picks a spare row (and real tokens)
    expected = tok.decode([i for i in ids if i < N_TOKENS])

    single = run_cli("generate", *args, "Hi")  # one prompt: streamed token by token
    assert single.returncode == 0, single.stderr
    assert single.stdout == expected + "\n"

    (tmp_path / "p.txt").write_text("Hi\n" * 3)
    batch = run_cli("generate", *args, "--file", str(tmp_path / "p.txt"), "--json")  # a batch
    assert batch.returncode == 0, batch.stderr
    records = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [r["ids"] for r in records] == [ids] * 3
    assert [r["answer"] for r in records] == [expected.strip()] * 3


# ------------------------------------------------------------------------------------------ NaN / inf


def write_nan_model(folder: Path, layer: int) -> Path:
    """The tiny Qwen3 with one NaN in layer `layer`'s MLP: that layer's output is the first non-finite value."""
    from safetensors.numpy import save_file

    write_tiny_qwen3(folder)
    tensors = tiny_qwen3_tensors(tiny_qwen3_config())
    tensors[f"model.layers.{layer}.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 0}], ids=["greedy", "sampled"])
def test_nan_logits_name_the_step_and_the_first_layer(tmp_path, sampling):
    model = tq.load_model(write_nan_model(tmp_path / "nan", layer=1))
    with pytest.raises(GenerationError) as error:
        tq.generate(model, [9707, 1879], 4, **sampling)
    message = str(error.value)
    assert "NaN" in message and "new token 1" in message
    assert "the output of layer 1 (of 2)" in message  # layer 0 is still finite
    with pytest.raises(GenerationError, match="batch row 0.*output of layer 1"):
        tq.generate_batch(model, [[9707], [1879, 11]], 4, **sampling)


def test_nan_made_by_padding_is_not_blamed_on_the_weights():
    """An attention kernel that masks with -inf makes NaN only in a left-padded batch (a padding query sees no key):
    the message must say so, not point at the weights, the final norm or lm_head."""
    import dataclasses

    from tinyqwen.attention import softmax

    def attention_minus_inf(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S]
        group = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.where(mask[:, None], q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]), -np.inf)
        with np.errstate(invalid="ignore"):
            return (softmax(scores) @ v).astype(np.float32)

    model = tq.load_model(FIXTURES / "dense-tied")
    model.backend = dataclasses.replace(model.backend, attention=attention_minus_inf)
    assert len(tq.generate(model, [5, 6, 7], 2, eos_token_ids=())) == 2  # alone: no padding, no NaN
    with pytest.raises(GenerationError, match="run alone .* all finite.*padded batch") as error:
        tq.generate_batch(model, [[5, 6, 7], [5]], 2, eos_token_ids=())
    assert "lm_head" not in str(error.value) and "weights" not in str(error.value)


def test_non_finite_logits_later_in_a_reply_name_that_step():
    def rule(history):  # fine for three new tokens, then +inf everywhere
        logits = np.zeros(64, np.float32)
        logits[(history[-1] + 1) % 64] = 5.0
        return logits if len(history) < 4 else np.full(64, np.inf, np.float32)

    model = StubModel(rule, vocab_size=64)
    with pytest.raises(GenerationError, match="infinite when choosing new token 4"):
        tq.generate(model, [1], 10)
    produced = []
    with pytest.raises(GenerationError):
        for token in tq.stream_generate(model, [1], 10):
            produced.append(token)
    assert produced == [2, 3, 4]  # what was streamed before the failure stays shown


def test_a_finished_row_does_not_trip_the_check():
    # row 0 stops at once (eos), after which its logits are never read; only live rows are checked
    def rule(history):
        if history[0] == 7 and len(history) > 1:  # row 0, after its eos: garbage nobody reads
            return np.full(64, np.nan, np.float32)
        return one_hot_rule(lambda h: 9 if h[0] == 7 else (h[-1] + 1) % 60, vocab=64)(history)

    model = StubModel(rule, vocab_size=64)
    assert tq.generate_batch(model, [[7], [1]], 3, eos_token_ids=[9]) == [[9], [2, 3, 4]]


# ------------------------------------------------------------------------------------------ library arguments


def test_ragged_ids_give_a_clear_error(tiny_qwen3_model):
    for call in (
        lambda: tiny_qwen3_model([[1, 2, 3], [4, 5]]),
        lambda: tiny_qwen3_model.forward([[1, 2, 3], [4]]),
        lambda: tiny_qwen3_model([[1, 2], 3]),
    ):
        with pytest.raises(GenerationError, match="rectangle.*different lengths"):
            call()
    with pytest.raises(GenerationError, match="generate_batch"):
        tq.generate(tiny_qwen3_model, [[1, 2, 3], [4, 5]], 2)
    with pytest.raises(GenerationError, match="prompt 1 is not a flat sequence"):
        tq.generate_batch(tiny_qwen3_model, [[1, 2], [3, [4, 5]]], 2)


def test_input_ids_is_accepted_as_in_transformers():
    model = StubModel(one_hot_rule(lambda h: (h[-1] + 1) % 1000))
    assert tq.generate(model, input_ids=[5, 6], max_new_tokens=3) == [7, 8, 9]
    assert list(tq.stream_generate(model, input_ids=[5], max_new_tokens=2)) == [6, 7]
    assert tq.generate_batch(model, input_ids=[[1], [5, 6]], max_new_tokens=2) == [[2, 3], [7, 8]]
    with pytest.raises(GenerationError, match="prompt_ids or input_ids, not both"):
        tq.generate(model, [1], 2, input_ids=[1])
    with pytest.raises(GenerationError, match="pass ids\\[0\\] for a \\[1, T\\] array"):
        tq.generate(model, input_ids=np.array([[5, 6]]), max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_new_tokens is required"):
        tq.generate(model, [5])


# ------------------------------------------------------------------------------------------ generate --file


def test_a_non_utf8_file_is_refused_before_anything_runs(tiny_qwen3_dir, tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("first prompt\ncaf\u00e9 au lait\n".encode("latin-1"))
    run = run_cli("generate", "--model", str(tiny_qwen3_dir), "--file", str(file))
    assert_one_line_error(run, "latin1.txt", "not UTF-8", "line 2", "0xe9")
    assert run.stdout == ""


def test_a_utf8_file_with_a_byte_order_mark_reads_as_text(tiny_qwen3_dir, tmp_path):
    file = tmp_path / "bom.txt"
    file.write_bytes("\ufeffHi\nHo\n".encode())
    run = run_cli("generate", "--model", str(tiny_qwen3_dir), "--file", str(file), "--json",
                   "--max-new-tokens", "1", "--temperature", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["prompt"] for line in run.stdout.splitlines()] == ["Hi", "Ho"]


def test_file_prompts_run_in_bounded_batches_each_written_when_done(tiny_qwen3_dir, tmp_path, monkeypatch):
    """1,500 prompts: no batch is larger than --batch-size, and every reply of batch k is written before batch
    k + 1 starts (the fake generate_batch records how much output exists when it is called)."""
    import tinyqwen.generation
    from tinyqwen.cli import main

    n, size = 1500, 64
    file = tmp_path / "many.txt"
    file.write_text("".join(f"prompt {i}\n" for i in range(n)))
    seen = []  # (batch size, replies written so far)

    def fake_generate_batch(model, prompts, max_new_tokens, **kwargs):
        seen.append((len(prompts), sys.stdout.getvalue().count("\n")))
        return [[9707, 151645] for _ in prompts]

    monkeypatch.setattr(tinyqwen.generation, "generate_batch", fake_generate_batch)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    args = ["generate", "--model", str(tiny_qwen3_dir), "--file", str(file), "--json", "--temperature", "0"]
    assert main([*args, "--batch-size", str(size)]) == 0
    lines = sys.stdout.getvalue().splitlines()
    assert len(lines) == n and json.loads(lines[-1]) == {
        "prompt": f"prompt {n - 1}", "thinking": "", "answer": "Hello", "ids": [9707, 151645]
    }  # fmt: skip
    assert max(b for b, _ in seen) == size and sum(b for b, _ in seen) == n
    assert [written for _, written in seen] == [size * k for k in range(len(seen))]

    seen.clear()
    sys.stdout = io.StringIO()
    assert main(args) == 0  # the default batch size is bounded too
    from tinyqwen.cli.generate import DEFAULT_BATCH_SIZE

    assert max(b for b, _ in seen) == DEFAULT_BATCH_SIZE == 8


def test_batches_keep_one_thinking_mode_and_the_order(tiny_qwen3_dir, tiny_qwen3_model, tok, tmp_path):
    from tinyqwen.chat_template import apply_chat_template

    prompts = ["What is 2+2?", "Hi /no_think", "Name a colour /no_think", "Why?", "Ok"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    run = run_cli("generate", "--model", str(tiny_qwen3_dir), "--file", str(tmp_path / "p.txt"), "--json",
                   "--batch-size", "2", "--temperature", "0", "--max-new-tokens", "4")  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for prompt, record in zip(prompts, records, strict=True):
        text = apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert record["ids"] == tq.generate(tiny_qwen3_model, tok.encode(text), 4)


def test_a_prompt_too_long_is_named_before_any_generation(tmp_path):
    folder = write_tiny_qwen3(tmp_path / "short", max_position_embeddings=32)
    (tmp_path / "p.txt").write_text("hi\n\n" + "word" + " word" * 39 + "\n")
    run = run_cli("generate", "--model", str(folder), "--raw", "--file", str(tmp_path / "p.txt"))
    assert_one_line_error(run, "p.txt line 3: prompt has 40 tokens but the model's context is 32")
    assert run.stdout == ""


@pytest.mark.parametrize("value", ["0", "-4"])
def test_batch_size_must_be_positive(tiny_qwen3_dir, value):
    run = run_cli("generate", "--model", str(tiny_qwen3_dir), "--batch-size", value, "hi")
    assert_one_line_error(run, f"--batch-size must be a whole number > 0, got {value}")


# ------------------------------------------------------------------------------------------ bench, verify


@pytest.mark.parametrize("flag", ["--prompt-tokens", "--new-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bench_rejects_non_positive_sizes(flag, value):
    run = run_cli("bench", "--model", str(FIXTURES / "dense-tied"), flag, value, "--no-peer")
    assert_one_line_error(run, f"{flag} must be a whole number > 0, got {value}")


def test_verify_tokens_and_seed_are_honoured_or_refused(monkeypatch, capsys):
    import tinyqwen.verify
    from tinyqwen.cli import main

    model_dir = str(FIXTURES / "dense-tied")
    monkeypatch.setattr(tinyqwen.verify, "transformers_available", lambda: False)
    for flags in (["--tokens", "5"], ["--seed", "3"]):
        assert main(["verify", "--model", model_dir, *flags]) == 1
        err = capsys.readouterr().err
        assert "--tokens and --seed choose the random ids of a live comparison" in err and "\n" == err[-1]

    # with transformers: the live comparison runs on 2 x --tokens ids drawn with --seed
    calls = []

    def fake_verify(model, ids):
        calls.append(ids)
        return tinyqwen.verify._compare(model(ids), model(ids), "fake", stored=False)

    monkeypatch.setattr(tinyqwen.verify, "transformers_available", lambda: True)
    monkeypatch.setattr(tinyqwen.verify, "verify", fake_verify)
    assert main(["verify", "--model", model_dir, "--tokens", "5", "--seed", "3"]) == 0
    assert main(["verify", "--model", model_dir, "--tokens", "5", "--seed", "4"]) == 0
    assert [ids.shape for ids in calls] == [(2, 5), (2, 5)] and not np.array_equal(calls[0], calls[1])
    assert "2 sequences x 5 tokens" in capsys.readouterr().out
    assert main(["verify", "--model", model_dir, "--tokens", "0"]) == 1
    assert "--tokens must be a whole number > 0, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ hub hint, --version, --help


def test_the_download_hint_names_the_command_the_installed_hub_provides(monkeypatch):
    import importlib.metadata

    from tinyqwen.hub import download_command

    class Dist:
        def __init__(self, *names):
            self.entry_points = [type("EP", (), {"name": n})() for n in names]

    def installed(*names):
        def distribution(name):
            assert name == "huggingface_hub"
            if not names:
                raise importlib.metadata.PackageNotFoundError(name)
            return Dist(*names)

        monkeypatch.setattr(importlib.metadata, "distribution", distribution)

    installed("huggingface-cli")  # huggingface_hub < 0.34
    assert download_command("Qwen/Qwen3-0.6B") == "huggingface-cli download Qwen/Qwen3-0.6B"
    installed("huggingface-cli", "hf")  # 0.34 ... 0.36: both; `hf` is the one documented
    assert download_command("Qwen/Qwen3-0.6B") == "hf download Qwen/Qwen3-0.6B"
    installed("hf", "tiny-agents")  # 1.0 and later: huggingface-cli is gone
    assert download_command("Qwen/Qwen3-0.6B") == "hf download Qwen/Qwen3-0.6B"
    installed()  # not installed: a fresh install of the [hub] extra brings `hf`
    assert download_command("Qwen/Qwen3-0.6B") == 'pip install "tinyqwen[hub]" && hf download Qwen/Qwen3-0.6B'


def test_version():
    run = run_cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"tinyqwen {tq.__version__}"


@pytest.mark.parametrize(
    "command, shown",
    [
        ("generate", ["(default: 2048)", "(default: 8)", "(default: numpy)"]),
        ("chat", ["(default: 2048)", "(default: numpy)"]),
        ("verify", ["(default: 1e-05)", "(default: 16;"]),
        ("bench", ["(default: 512)", "(default: 128)", "(default: 2)"]),
    ],
)
def test_help_shows_the_defaults(command, shown):
    run = run_cli(command, "--help")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())  # argparse wraps lines
    for fragment in shown:
        assert fragment in text, (fragment, text)
    assert "(default: None)" not in text and "(default: False)" not in text
