"""The tinyqwen engine on the "cupy" backend (an NVIDIA GPU): greedy on the GPU, its HBM peak for the report."""

from __future__ import annotations

import numpy as np


def load(path: str, threads: int, option: str, max_len: int):
    import tinyqwen
    from tinyqwen.backends import cupy as cupy_backend
    from tinyqwen.bench.runner import resident_bytes

    model = tinyqwen.load_model(path, backend="cupy")
    kernels = model.backend

    class Engine:
        version = f"tinyqwen {tinyqwen.__version__} (cupy backend, {cupy_backend.device_name()})"
        weight_bytes = resident_bytes(model.weights)  # on the GPU, in the checkpoint's dtype
        hbm_peak_gb_s = cupy_backend.hbm_peak_gb_s()

        def prefill(self, ids):
            self.cache = model.new_cache(1, max_len)
            return self.step_ids(np.asarray([ids]))

        def step(self, token):
            return self.step_ids(np.asarray([[token]]))

        def step_ids(self, ids):
            # greedy where the logits are; bringing the id back waits for the GPU, so the host clock times real work
            logits = model.forward(ids, cache=self.cache, last_only=True, on_device=True).logits
            return int(kernels.greedy(logits[:, -1])[0])

    return Engine()
