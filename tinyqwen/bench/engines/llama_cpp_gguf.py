"""The llama.cpp engine (llama-cpp-python) on a GGUF file (the option is its path), in a Python that has it."""

from __future__ import annotations

import importlib
import os

import numpy as np


def load(path: str, threads: int, option: str, max_len: int):
    llama_cpp = importlib.import_module("llama_cpp")
    llm = llama_cpp.Llama(model_path=option, n_ctx=max_len, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)  # fmt: skip
    vocab = llm.n_vocab()

    def first_new_token():  # the logits of the last token evaluated
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())

    class Engine:
        version = f"llama-cpp-python {llama_cpp.__version__}"

        @property
        def weight_bytes(self):  # the GGUF's tensor data; the file size if the gguf package is missing
            try:
                return sum(int(t.n_bytes) for t in importlib.import_module("gguf").GGUFReader(option).tensors)
            except Exception:
                return os.path.getsize(option)

        def prefill(self, ids):
            llm.reset()
            llm.eval(ids)
            return first_new_token()

        def step(self, token):
            llm.eval([token])
            return first_new_token()

    return Engine()
