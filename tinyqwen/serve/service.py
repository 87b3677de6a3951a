"""The service: everything between a JSON body and a Job, and between a finished Job and the JSON reply.

No HTTP here (that is `tinyqwen.serve.app`): a request body is checked (`tinyqwen.serve.protocol`), its prompt
rendered (chat template, injection-safe) and tokenized, its sampling settings resolved, and it becomes a `Job` for
the worker; the worker's events become OpenAI's response object or its stream of chunks.

Sampling: unset knobs take Qwen's preset for the turn's mode (thinking: the checkpoint's generation_config.json;
non-thinking, through `enable_thinking=False` or `/no_think`: T 0.7, top-p 0.8, top-k 20), as `tinyqwen chat`
does; vLLM takes generation_config.json for both. `top_k=-1` means off (vLLM's spelling), as does 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tinyqwen.errors import TinyQwenError
from tinyqwen.sampling import NON_THINKING, THINKING, SamplingParams
from tinyqwen.serve.engine import Engine, Job
from tinyqwen.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    bad,
    chat_messages,
    chat_tools,
    check_fields,
    enable_thinking,
    max_tokens,
    reply_options,
    sampling_settings,
    stop_strings,
)
from tinyqwen.serve.reply_parser import ParsedReply, ReplyParser
from tinyqwen.thinking import thinking_mode


@dataclass
class Prepared:
    """A checked request, ready for the worker."""

    job: Job
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat: bool


class Service:
    """Everything between a JSON body and a Job, and between a finished Job and the JSON reply; no HTTP here.

    `model_name` is what clients send as `model` (vLLM: the path given to --model, or --served-model-name);
    `engine_options` go to the Engine (max_batch, kv_budget, prefill_chunk, max_queue, kv_dtype).
    """

    def __init__(self, model, tokenizer, model_name: str, **engine_options):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine = Engine(model, tokenizer, **engine_options)
        self.context = model.config.max_position_embeddings
        self.generation_config = getattr(model, "generation_config", None) or {}
        eos = self.generation_config.get("eos_token_id", getattr(model.config, "eos_token_id", None))
        self.eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.created = int(time.time())

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tinyqwen",
                "max_model_len": self.context}  # fmt: skip
        return {"object": "list", "data": [card]}

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str):
            raise bad("'model' is required: the name from GET /v1/models", "model")
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def _job(self, body, prompt_ids, params, seed, parser, limit: int) -> Job:
        kwargs: dict = {"params": params, "temperature": params.temperature, "eos_token_ids": self.eos}
        if not params.greedy:
            kwargs["seed"] = seed
        return Job(prompt_ids, limit, kwargs, parser)

    def prepare_chat(self, body: Any) -> Prepared:
        body = check_fields(body, CHAT_FIELDS)
        self._check_model(body)
        messages, tools, thinking_on = chat_messages(body), chat_tools(body), enable_thinking(body)
        try:
            prompt_ids = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=True,
                enable_thinking=thinking_on,
                return_dict=False,
            )  # sanitize_control_tokens=True: text in messages never becomes a control token
        except TinyQwenError as error:
            raise bad(" ".join(str(error).split()), "messages") from None
        thinking = thinking_mode(messages, thinking_on)
        base = (
            SamplingParams.from_generation_config(self.generation_config, base=THINKING)
            if thinking
            else NON_THINKING
        )
        params, seed = sampling_settings(body, base)
        stops = stop_strings(body)
        limit = max_tokens(body, len(prompt_ids), self.context, None)
        parser = ReplyParser(self.tokenizer, self.eos, stops, tools=tools or False, prompt_ids=prompt_ids,
                             thinking=thinking_on)  # fmt: skip
        return self._prepared(body, self._job(body, prompt_ids, params, seed, parser, limit), chat=True)

    def prepare_completion(self, body: Any) -> Prepared:
        body = check_fields(body, COMPLETION_FIELDS)
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            prompt_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt):  # fmt: skip
            bad_ids = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
            if bad_ids:
                raise bad(f"prompt id {bad_ids[0]} is outside the vocabulary", "prompt")
            prompt_ids = list(prompt)
        else:
            raise bad("'prompt' must be a non-empty string or list of token ids (one prompt)", "prompt")
        base = SamplingParams.from_generation_config(
            self.generation_config, base=SamplingParams(temperature=1.0)
        )
        params, seed = sampling_settings(body, base)
        stops = stop_strings(body)
        limit = max_tokens(
            body, len(prompt_ids), self.context, 16
        )  # OpenAI's and vLLM's default for completions
        parser = ReplyParser(self.tokenizer, self.eos, stops, tools=False, reasoning=False)
        return self._prepared(body, self._job(body, prompt_ids, params, seed, parser, limit), chat=False)

    def _prepared(self, body: dict, job: Job, chat: bool) -> Prepared:
        stream, include_usage, return_token_ids = reply_options(body)
        return Prepared(job, stream, include_usage, return_token_ids, chat)

    # ---- replies

    def usage(self, job: Job) -> dict:
        n, m = len(job.prompt_ids), len(job.output_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    @staticmethod
    def finish_reason(reply: ParsedReply) -> str:
        if reply.tool_calls:
            return "tool_calls"
        return "stop" if reply.stopped_by else "length"

    def response(self, p: Prepared, reply: ParsedReply) -> dict:
        job = p.job
        if p.chat:
            # a part with no text is null, as vLLM sends it (and OpenAI beside tool calls)
            message: dict = {"role": "assistant", "content": reply.content or None}
            message["reasoning_content"] = reply.reasoning or None
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            choice: dict = {"index": 0, "message": message, "finish_reason": self.finish_reason(reply)}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": reply.content or "", "finish_reason": self.finish_reason(reply)}
            kind, prefix = "text_completion", "cmpl"
        choice["logprobs"] = None
        out = {"id": f"{prefix}-{job.id}", "object": kind, "created": int(time.time()), "model": self.model_name,
               "choices": [choice], "usage": self.usage(job)}  # fmt: skip
        if p.return_token_ids:
            choice["token_ids"] = list(job.output_ids)
            out["prompt_token_ids"] = list(job.prompt_ids)
        return out

    def chunk(
        self, p: Prepared, delta: dict | None = None, finish: str | None = None, text: str = ""
    ) -> dict:
        job = p.job
        if p.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            kind, prefix = "chat.completion.chunk", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind, prefix = "text_completion", "cmpl"
        if finish is not None and p.return_token_ids:
            choice["token_ids"] = list(job.output_ids)
        return {"id": f"{prefix}-{job.id}", "object": kind, "created": int(time.time()),
                "model": self.model_name, "choices": [choice]}  # fmt: skip

    def stream_events(self, p: Prepared, event: tuple) -> list[dict]:
        """The SSE chunks for one worker event."""
        kind, value = event
        if kind == "deltas":
            if p.chat:
                return [self.chunk(p, {("reasoning_content" if k == "reasoning" else "content"): t})
                        for k, t in value]  # fmt: skip
            return [self.chunk(p, text=t) for _, t in value]
        reply: ParsedReply = value
        out = []
        if p.chat and reply.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(reply.tool_calls)]
            out.append(self.chunk(p, {"tool_calls": calls}))
        out.append(self.chunk(p, {}, finish=self.finish_reason(reply)))
        if p.include_usage:
            last = self.chunk(p)
            last["choices"], last["usage"] = [], self.usage(p.job)
            out.append(last)
        return out
