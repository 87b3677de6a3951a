"""Benchmarks: every engine in its own process, timed the same way, compared as ratios from one run.

Host timings swing 30-50% between runs on a shared machine, so a lone tokens-per-second figure says little; the
ratio to a peer timed minutes apart on the same machine says much more. One run measures:

- tinyqwen with each backend that exists here ("numpy", "numba", and "numba" with matmul_precision="medium"; "cupy"
  on an NVIDIA GPU, when asked for: `tinyqwen bench --backend cupy` — its decode GB/s is the achieved HBM
  bandwidth, shown against the GPU's peak);
- Hugging Face transformers, fp32 and bf16, and llama.cpp (llama-cpp-python) on GGUF files (bf16, q8_0, ...),
  in a Python that has them (`peer_python`, e.g. the peers' venv that ../shared/peers/setup builds);
  tinyqwen never imports torch or llama_cpp: the peers only ever run as child processes;
- the machine's GEMV bandwidth: NumPy's fp32 BLAS matrix-vector product on the lm_head's shape.

Every engine runs in its own child process (so its peak RSS is its own, and thread pools never fight), with the
same thread count (OMP/OpenBLAS/MKL/Numba env vars, torch.set_num_threads, llama.cpp n_threads), greedy, on the
same random prompt ids, through the one timing loop, `engines/driver.py` (each engine is a module of `engines/`):

    load                         -> load_s, peak RSS after load
    8-token prompt + 2 steps     -> first_call_s, run twice (numba: compile_s = time in its compiler, fresh cache,
                                    in a first process; the timed one loads the compiled kernels from that cache)
    P-token prompt, then N steps -> TTFT = time to the first new token = prefill time; decode time of N tokens
                                    (best of `repeat`, prefill and decode each)

prefill tok/s = P / TTFT, decode tok/s = N / decode time. Decode bandwidth = bytes of weights one decode step reads
(`decode_params(config)` x the engine's resident bytes per weight) / time per token.

    report = run_benchmark("path/to/qwen3-0.6b-random", peer_python="path/to/peer-venv/bin/python")
    print(format_report(report))

`runner.py` plans, runs and reports; `engines/` holds the timing loop and one module per engine.
"""

from tinyqwen.bench.runner import (
    ENGINE_KINDS,
    GEMV_SHAPE,
    KNOWN_KINDS,
    NUMBA_KV_DTYPE,
    THREADS,
    TINYQWEN_BACKENDS,
    TRANSFORMERS_DTYPES,
    Engine,
    cpu_name,
    decode_params,
    find_ggufs,
    format_report,
    gguf_label,
    measure_gemv,
    plan_engines,
    ratios,
    resident_bytes,
    run_benchmark,
    run_engine,
    summarise,
    thread_env,
)

__all__ = [
    "ENGINE_KINDS", "GEMV_SHAPE", "KNOWN_KINDS", "NUMBA_KV_DTYPE", "THREADS", "TINYQWEN_BACKENDS",
    "TRANSFORMERS_DTYPES", "Engine", "cpu_name", "decode_params", "find_ggufs", "format_report", "gguf_label",
    "measure_gemv", "plan_engines", "ratios", "resident_bytes", "run_benchmark", "run_engine", "summarise",
    "thread_env",
]  # fmt: skip
