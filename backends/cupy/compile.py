"""Compiling the CUDA C sources of backends/cuda/ with NVRTC (through CuPy's binding): PTX for a virtual
architecture, or ptxas's resource report (registers, spills, shared memory) for a real one. Neither needs a GPU,
only the NVRTC library and the CUDA headers.
"""

from __future__ import annotations

from pathlib import Path

from tinyqwen.errors import BackendError

KERNEL_DIR = Path(__file__).parent.parent / "cuda"

# the virtual architectures CI compiles every kernel for: T4 (Colab), A100, RTX 30xx / A10, RTX 40xx / L4, H100/H200.
# sm_75 has no bf16 arithmetic: the kernels keep bf16 as storage and compute in float32 on every architecture
ARCHITECTURES = ("compute_75", "compute_80", "compute_86", "compute_89", "compute_90")
INSTALL = "pip install -e '.[gpu]' (cupy-cuda12x, nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12; ~230 MB)"


def cuda_include_dirs() -> list[Path]:
    """Folders holding cuda_bf16.h: the nvidia-cuda-runtime-cu12 wheel's include/, else $CUDA_PATH/include."""
    import os

    dirs = []
    try:
        import nvidia.cuda_runtime

        dirs += [Path(p) / "include" for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    return [d for d in dirs if (d / "cuda_bf16.h").is_file()]


def compile_options(arch: str | None = None) -> list[str]:
    """NVRTC options: C++17, our own folder and the CUDA headers on the include path, and the target if given."""
    includes = cuda_include_dirs()
    if not includes:
        raise BackendError(f"cuda_bf16.h not found (the CUDA runtime headers): {INSTALL}")
    options = ["--std=c++17", f"-I{KERNEL_DIR}", *(f"-I{d}" for d in includes)]
    return options + ([f"--gpu-architecture={arch}"] if arch else [])


def ptxas_report(source: Path, arch: str) -> dict[str, dict[str, int]]:
    """{kernel: {"registers", "spill_bytes", "shared_bytes"}} from compiling `source` to `arch` (sm_75 ... sm_90)
    machine code with ptxas -v, through NVRTC: what decides whether a launch of N threads fits one SM. No GPU needed.
    """
    import re

    from cupy.cuda import nvrtc

    program = nvrtc.createProgram(source.read_text(), source.name, [], [])
    try:
        nvrtc.compileProgram(
            program, [*compile_options(), f"--gpu-architecture={arch}", "--ptxas-options=-v"]
        )
        log = nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
    report = {}
    for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|\Z)", log, re.S):
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        shared = re.search(r"(\d+) bytes smem", body)
        report[name] = {
            "registers": int(re.search(r"Used (\d+) registers", body).group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "shared_bytes": int(shared.group(1)) if shared else 0,
        }
    return report


def nvrtc_unavailable_reason() -> str | None:
    """None when CUDA C can be compiled here (CuPy's NVRTC binding and the CUDA headers), else why, in one line.

    A learner's install (the `course` extra) leaves the ~230 MB of GPU tools out: chapter 11 then runs every kernel
    on the tests' CPU executor of CUDA C (g++) and skips only the NVRTC compiles, saying so.
    """
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return f"NVRTC (CuPy's binding) is not installed: {INSTALL}"
    if not cuda_include_dirs():
        return f"cuda_bf16.h not found (the CUDA runtime headers): {INSTALL}"
    return None


def compile_ptx(source: str | Path, arch: str, name: str = "kernel.cu") -> str:
    """CUDA C source (text, or a .cu file) -> PTX for `arch` via NVRTC; a BackendError carrying NVRTC's log.

    Needs no GPU and no driver: only the NVRTC library (nvidia-cuda-nvrtc-cu12) and the headers.
    """
    try:
        from cupy.cuda import nvrtc
    except ImportError:
        raise BackendError(f"compiling CUDA kernels needs CuPy's NVRTC binding: {INSTALL}") from None
    if isinstance(source, Path):
        name, source = source.name, source.read_text()
    program = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, compile_options(arch))
        except nvrtc.NVRTCError:
            log = nvrtc.getProgramLog(program).strip()
            raise BackendError(f"{name} does not compile for {arch}: {log}") from None
        ptx = nvrtc.getPTX(program)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(program)
