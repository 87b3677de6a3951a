"""Test helpers, shipped with the package (as `numpy.testing` is): used by the tests, the exercise graders and
their reference makers, the chapter-12 notebook and the serving benchmark. Nothing in tinyqwen's own code path
imports this module.

- A tiny random Qwen3 checkpoint with the REAL vocabulary (151,936 rows): two layers, hidden size 32, the official
  config.json key set, float32 weights drawn by NumPy from a seed. Small enough to build in a second, real enough
  that the real tokenizer, chat template and generation settings apply. `tiny_qwen3_config`,
  `tiny_qwen3_tensors` and `write_tiny_qwen3`.
- `ScriptedModel` / `scripted_reply`: the real model with its choices steered to a script, so that a random
  checkpoint thinks, calls tools and stops on cue.
- `asgi_call` / `asgi_request`: one HTTP request to an ASGI app in-process, as uvicorn would make it.

>>> config = tiny_qwen3_config()
>>> config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
(151936, 32, 2)
>>> tiny_qwen3_tensors(config)["model.layers.0.self_attn.q_proj.weight"].shape  # [heads * head_dim, hidden]
(64, 32)
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinyqwen.errors import TinyQwenError

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
QWEN3_VOCAB = 151936

# ------------------------------------------------------------------------------------------ a tiny checkpoint


def tiny_qwen3_config(**overrides) -> dict:
    """config.json in the official Qwen3 layout (Qwen3-0.6B's key set), shrunk, with the real vocabulary."""
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 1024,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": QWEN3_VOCAB,
    }
    config.update(overrides)
    return config


QWEN3_GENERATION_CONFIG = {  # the official Qwen3 generation_config.json values
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}

END_TO_END_SCALE = 0.3  # chapter 9's end-to-end model (and chapter 12's): weights that give varied tokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def tiny_qwen3_tensors(config: dict, seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    """The checkpoint's weights under their official names, float32, from `np.random.default_rng(seed)`.

    Projections are N(0, scale²), the embedding N(0, 0.25), norms 1 + N(0, scale²); the draws happen in the order
    written below (embedding, final norm, then layer by layer), so a seed always gives the same bytes. Chapter 9's
    end-to-end model uses `END_TO_END_SCALE` (0.3): large enough that attention and MLP move the residual stream,
    so that greedy decoding writes varied tokens.
    """
    rng = np.random.default_rng(seed)
    H, ffn, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape, scale=scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": w(config["vocab_size"], H, scale=0.5),  # [vocab, H]
        "model.norm.weight": w(H) + 1,
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": w(H) + 1,
            p + "post_attention_layernorm.weight": w(H) + 1,
            p + "self_attn.q_proj.weight": w(nq * d, H),
            p + "self_attn.k_proj.weight": w(nkv * d, H),
            p + "self_attn.v_proj.weight": w(nkv * d, H),
            p + "self_attn.o_proj.weight": w(H, nq * d),
            p + "self_attn.q_norm.weight": w(d) + 1,
            p + "self_attn.k_norm.weight": w(d) + 1,
            p + "mlp.gate_proj.weight": w(ffn, H),
            p + "mlp.up_proj.weight": w(ffn, H),
            p + "mlp.down_proj.weight": w(H, ffn),
        }
    return tensors


def write_tiny_qwen3(
    folder: str | Path, seed: int = 0, scale: float = 0.1, with_tokenizer: bool = True, **config_overrides
) -> Path:
    """Write the tiny checkpoint to `folder`: config.json, generation_config.json, model.safetensors and, with
    `with_tokenizer`, the packaged Qwen3 tokenizer files (then `Tokenizer.from_pretrained(folder)` works too).

    `config_overrides` change config.json; the tensors follow its sizes. The file never holds `lm_head.weight`
    (the config says the head is tied): with `tie_word_embeddings=False` the caller writes its own head.
    """
    from tinyqwen.safetensors import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen3_config(**config_overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "generation_config.json").write_text(
        json.dumps(QWEN3_GENERATION_CONFIG, indent=4, sort_keys=True)
    )
    tensors = tiny_qwen3_tensors(config, seed, scale)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    # tokenizer.json is not packaged (vocab.json and merges.txt hold the same tokenizer), so it is skipped
    for name in TOKENIZER_FILES if with_tokenizer else ():
        if (PACKAGE_DATA / name).is_file():
            shutil.copy(PACKAGE_DATA / name, folder / name)
    return folder


# ------------------------------------------------------------------------------------------ a scripted model


class ScriptedModel:
    """A real model whose choices are steered to a script: for tests, the benchmark and the chapter.

    A random fixture checkpoint writes gibberish, so it never thinks, calls a tool or stops on cue. This wrapper
    runs the real model (real prefill, real KV cache, real logits) and then adds `margin` to the logit of the id
    `script(prompt_ids, generated_ids)` names, or nothing when it returns None. Everything after the logits --
    sampling, the generation loop, the server, the parsers -- runs as it would for a real Qwen3 that wrote those
    ids. A margin of 1e4 makes the scripted id win under any temperature or filter (its probability is 1 in float64).

    One sequence at a time (batch 1), or a server's batch: a cache that says which sequences are in its rows
    (`cache.sequences`, each with `.prompt` and `.output` ids, as tinyqwen/serve/kv_pool.py's caches do) is
    scripted row by row, from each row's own prompt and output.
    """

    def __init__(self, model, script: Callable[[list[int], list[int]], int | None], margin: float = 1e4):
        self.model, self.script, self.margin = model, script, margin
        self.config, self.generation_config = model.config, getattr(model, "generation_config", {})
        self._prompt: list[int] = []
        self._seen: list[int] = []

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def forward(self, ids, *, cache=None, **kwargs):
        ids = np.asarray(ids)
        sequences = getattr(cache, "sequences", None)
        if sequences is not None:  # a server's batch: every row knows its own prompt and output
            out = self.model.forward(ids, cache=cache, **kwargs)
            for b, seq in enumerate(sequences):
                wanted = self.script(list(seq.prompt), list(seq.output))
                if wanted is not None:
                    out.logits[b, -1, wanted] += self.margin
            return out
        if ids.shape[0] != 1:
            raise TinyQwenError("ScriptedModel runs one sequence at a time")
        if cache is None or cache.length == 0:  # a new prefill: a new request
            self._prompt, self._seen = [], []
        fed = [int(t) for t in ids[0]]
        if cache is not None and cache.length > 0 and self._prompt:
            self._seen.extend(fed)  # decode steps feed back the generated ids
        else:
            self._prompt.extend(fed)
        out = self.model.forward(ids, cache=cache, **kwargs)
        wanted = self.script(list(self._prompt), list(self._seen))
        if wanted is not None:
            out.logits[0, -1, wanted] += self.margin
        return out


def scripted_reply(
    tokenizer, replies: Callable[[str], str | None]
) -> Callable[[list[int], list[int]], int | None]:
    """A script for ScriptedModel from text: `replies(prompt_text)` is the reply to write (special tokens such as
    `<think>`, `<tool_call>`, `<|im_end|>` allowed), or None to let the model write what it wants.

    >>> from tinyqwen.tokenizer import Tokenizer
    >>> tok = Tokenizer.qwen3()
    >>> script = scripted_reply(tok, lambda prompt: "Hi!<|im_end|>")
    >>> [script([1], tok.encode("Hi!")[:n]) for n in range(3)]
    [13048, 0, 151645]
    """
    cache: dict[str, list[int]] = {}

    def script(prompt_ids: list[int], generated: list[int]) -> int | None:
        key = ",".join(map(str, prompt_ids))
        if key not in cache:
            text = replies(tokenizer.decode(prompt_ids))
            cache.clear()
            cache[key] = [] if text is None else tokenizer.encode(text, allowed_special="all")
        ids = cache[key]
        return ids[len(generated)] if len(generated) < len(ids) else None

    return script


# ------------------------------------------------------------------------------------------ HTTP without a network


async def asgi_request(
    app, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, dict, bytes]:
    """`asgi_call` for code that already runs in an event loop (several requests at once with asyncio.gather).

    `headers`: the request's headers as ASGI gives them, lower-case names in bytes (default: a JSON Content-Type).
    """
    done = asyncio.Event()
    sent = False
    status, answer_headers, chunks = 0, {}, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")] if headers is None else headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    await app(scope, receive, send)
    return status, answer_headers, b"".join(chunks)


def asgi_call(app, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request to an ASGI app, in-process, without a network: what uvicorn does for each request.

    An ASGI server calls `app(scope, receive, send)`: `scope` describes the request, `receive()` hands over the
    body, and the app calls `send()` with the status and headers, then the body in one or more pieces (one per SSE
    event when streaming). Returns (status, headers, body bytes).
    """
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return run_sync(asgi_request(app, method, path, data))


def run_sync(coroutine):
    """Run a coroutine to the end and return its result, also where an event loop already runs (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a fresh event loop in a thread of its own
        return pool.submit(asyncio.run, coroutine).result()


__all__ = ["QWEN3_GENERATION_CONFIG", "QWEN3_VOCAB", "ScriptedModel", "asgi_call", "asgi_request", "run_sync",
           "scripted_reply", "tiny_qwen3_config", "tiny_qwen3_tensors", "write_tiny_qwen3"]  # fmt: skip
