"""The tinyqwen engine on a CPU backend: "numpy", "numba", "numba:medium" (matmul_precision), ":bfloat16" (KV cache).

The option reads backend[:precision[:kv_dtype[:quant_gemv]]], e.g. "numba:medium:bfloat16" -> backend numba,
matmul_precision="medium", a bfloat16 KV cache; "numba:::float" -> a GGUF file's quantized weights through the
float GEMVs instead of the default int8 ones (backends/numba/quant.py).
"""

from __future__ import annotations

import numpy as np


def load(path: str, threads: int, option: str, max_len: int):
    import tinyqwen
    from tinyqwen.bench.runner import resident_bytes

    backend, precision, kv_dtype, quant_gemv = (option.split(":") + ["", "", ""])[:4]
    clock = None
    if backend == "numba":
        from tinyqwen.backends.numba import compile_clock

        clock = compile_clock()
    model = tinyqwen.load_model(path, backend=backend, matmul_precision=precision or "highest")
    if quant_gemv:  # the same weights, the other decode GEMV for quantized blocks
        from tinyqwen.backends.numba import backend as numba_backend

        model.backend = numba_backend(precision or "highest", quant_gemv=quant_gemv)
    if precision == "medium":
        from tinyqwen.backends import onednn

        precision = f", matmul_precision={precision}" + (", oneDNN" if onednn.available() else ", no oneDNN")
    else:
        precision = ""
    kv_dtype = kv_dtype or "float32"
    if kv_dtype != "float32":
        precision += f", KV cache {kv_dtype}"
    if quant_gemv:
        precision += f", {quant_gemv} GEMVs"

    class Engine:
        version = f"tinyqwen {tinyqwen.__version__} ({backend} backend{precision})"
        weight_bytes = resident_bytes(model.weights)
        compile_s = property(lambda self: clock.total if clock else float("nan"))

        def prefill(self, ids):
            self.cache = None  # the last run's cache goes first: a new prompt never holds two caches at once
            self.cache = model.new_cache(1, max_len, kv_dtype)
            return self.step_ids(np.asarray([ids]))

        def step(self, token):
            return self.step_ids(np.asarray([[token]]))

        def step_ids(self, ids):
            return int(model.forward(ids, cache=self.cache, last_only=True).logits[0, -1].argmax())

    return Engine()
