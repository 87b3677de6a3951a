"""The benchmark's engines: each a small module run in a child process of its own (see `tinyqwen.bench.runner`).

Every engine module defines `load(path, threads, option, max_len)`, which returns an object with
`prefill(ids) -> first new token`, `step(token) -> next token`, `version` and `weight_bytes` (resident bytes of
its weights; read after the peak RSS), and optionally `compile_s` and `hbm_peak_gb_s`. `driver.main(load)` times it.

The child runs a file by its path (`runpy.run_path`), not as `tinyqwen.bench.engines.x`: a peer's engine
(transformers, llama.cpp) runs in another virtualenv's Python, which may not have tinyqwen installed. So the driver
and the peer engines import nothing of tinyqwen's.
"""
