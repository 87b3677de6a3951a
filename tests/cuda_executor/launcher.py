"""Compile CUDA C for the CPU (g++ and cuda_cpu.h) and launch its kernels through ctypes, like cupy.RawModule.

`RawModule(code=..., options=...)` parses the `extern "C" __global__` kernels' signatures, appends one
`extern "C"` launch wrapper per kernel, compiles the result once per (source, headers, flags) hash into a cache
folder, and `get_function(name)` returns a callable `(grid, block, args, shared_mem=0)` — CuPy's calling convention,
so `CudaKernels(xp, module=RawModule)` runs the backend's own launch code unchanged. Each launch checks what a GPU
would only get wrong silently: the argument count, each scalar's exact type (np.int32 for `int`, ...), each array's
dtype against the C type it points to, and the launch shape (at most 1,024 threads, 48 KB of dynamic shared memory).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_cpu.h"
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
FLAGS = [
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-U_FORTIFY_SOURCE",
    "-w",
]
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]

# C scalar types -> the NumPy scalar type a launch must pass; C pointee types -> the dtypes an array may have
SCALARS = {"int": np.int32, "unsigned": np.uint32, "unsigned int": np.uint32, "long long": np.int64,
           "unsigned long long": np.uint64, "float": np.float32, "double": np.float64}  # fmt: skip
POINTEES = {"float": ("float32",), "double": ("float64",), "int": ("int32",), "unsigned": ("uint32",),
            "unsigned int": ("uint32",), "long long": ("int64",), "unsigned long long": ("uint64",),
            "unsigned char": ("uint8", "bool"), "char": ("int8", "uint8", "bool"), "__nv_bfloat16": ("uint16",),
            "__half": ("float16",)}  # fmt: skip
CTYPES = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
          np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float, np.float64: ctypes.c_double}  # fmt: skip


class KernelMisuse(AssertionError):
    """A kernel did something that is undefined on a GPU (a barrier not every thread reaches, a shuffle naming an
    exited or inactive lane, a deadlock), or was launched with arguments it does not take."""


def cache_dir() -> Path:
    root = os.environ.get("TINYQWEN_EXECUTOR_CACHE") or Path(tempfile.gettempdir()) / "tinyqwen-cuda-executor"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def kernel_signatures(code: str) -> dict[str, list[tuple[str, str]]]:
    """{kernel: [(C type, name), ...]} of every `extern "C" __global__` kernel in `code`."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", code, flags=re.S)
    found = {}
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\((.*?)\)\s*\{'
    for name, body in re.findall(pattern, text, re.S):
        params = []
        for param in filter(None, (p.strip() for p in body.split(","))):
            words = param.replace("*", " * ").split()
            params.append((" ".join(words[:-1]), words[-1]))
        found[name] = params
    return found


def _pointee(c_type: str) -> str | None:
    """'const float * __restrict__' -> 'float'; a scalar's type -> None."""
    if "*" not in c_type:
        return None
    return " ".join(w for w in c_type.split() if w not in ("const", "__restrict__", "*", "volatile"))


def _scalar(c_type: str) -> str:
    return " ".join(w for w in c_type.split() if w != "const")


def asan_loaded() -> bool:
    return hasattr(ctypes.CDLL(None), "__asan_init")


class RawModule:
    """CUDA C source compiled for the CPU; `get_function(name)` -> a kernel launcher, as cupy.RawModule.

    order: "forward", "reverse" or "random" (seeded: `seed`) — the order blocks and threads run in.
    asan: compile with AddressSanitizer and give each array argument its own exactly-sized allocation for the
    launch, so a read or write outside it stops the process with ASan's report (the process must have libasan
    loaded first: LD_PRELOAD, see `asan_environment`).
    """

    def __init__(self, code: str, options=(), backend: str = "nvrtc", name_expressions=None,
                 order: str | None = None, seed: int = 0, asan: bool = False):  # fmt: skip
        self.code, self.asan = code, asan
        self.order = order or os.environ.get("TINYQWEN_EXECUTOR_ORDER", "forward")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {self.order!r}")
        self.seed = seed
        self.includes = [Path(o[2:]) for o in options if o.startswith("-I")]
        self.signatures = kernel_signatures(code)
        if asan and not asan_loaded():
            raise RuntimeError("asan=True needs libasan loaded first: run under asan_environment()")
        self.lib = ctypes.CDLL(str(self._build()))

    def _source(self) -> str:
        # dynamic shared memory: `extern __shared__ T name[];` becomes a pointer to the launch's buffer
        code = re.sub(
            r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;",
            r"\1* \2 = (\1*)tq::dynamic_shared;",
            self.code,
        )
        wrappers = []
        for name, params in self.signatures.items():
            unpack = ", ".join(
                f"*({c_type.replace('__restrict__', '')}*)a[{i}]" for i, (c_type, _) in enumerate(params)
            )
            wrappers.append(
                f"static void tq_body_{name}(void** a) {{ {name}({unpack}); }}\n"
                f'extern "C" int tq_launch_{name}(const unsigned* grid, const unsigned* block, size_t shared, '
                f"int how, unsigned long long seed, size_t stack, void** args, char* error, size_t size) {{\n"
                f"    return tq::launch(grid, block, shared, how, seed, stack, tq_body_{name}, args, error, size);\n"
                f"}}\n"
            )
        return code + "\n\n// launch wrappers, generated from the kernels' signatures\n" + "\n".join(wrappers)

    def _build(self) -> Path:
        source = self._source()
        flags = FLAGS + (ASAN_FLAGS if self.asan else [])
        digest = hashlib.sha256()
        for part in (source, HEADER.read_text(), " ".join(flags)):
            digest.update(part.encode())
        for folder in self.includes:  # the headers the source may include (common.cuh)
            for header in sorted(folder.glob("*.cuh")) + sorted(folder.glob("*.h")):
                digest.update(header.name.encode() + header.read_bytes())
        out = cache_dir() / f"{digest.hexdigest()[:24]}.so"
        if out.exists():
            return out
        cu = out.with_suffix(f".{os.getpid()}.cpp")
        cu.write_text(source)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        if shutil.which("g++") is None:
            raise RuntimeError(
                "the CPU executor of CUDA C needs a C++ compiler, g++, and finds none on PATH: "
                "apt-get install g++ (Debian/Ubuntu), or your system's build tools"
            )
        command = ["g++", *flags, "-include", str(HEADER), f"-I{HERE / 'include'}"]
        command += [f"-I{d}" for d in self.includes] + [str(cu), "-o", str(tmp)]
        run = subprocess.run(command, capture_output=True, text=True)
        cu.unlink()
        if run.returncode:
            raise RuntimeError(f"the CPU build of the CUDA source failed:\n{run.stderr[-4000:]}")
        os.replace(tmp, out)  # atomic: a parallel build of the same source finds a whole file or none
        return out

    def get_function(self, name: str) -> Kernel:
        if name not in self.signatures:
            raise KeyError(f"no kernel {name!r} in this module (it has {sorted(self.signatures)})")
        return Kernel(self, name)


class Kernel:
    """One kernel of a RawModule, launched as CuPy launches one: kernel(grid, block, args, shared_mem=0)."""

    def __init__(self, module: RawModule, name: str):
        self.module, self.name, self.params = module, name, module.signatures[name]
        self.fn = getattr(module.lib, f"tq_launch_{name}")
        self.fn.restype = ctypes.c_int
        self.launches = 0

    def _check(self, args) -> None:
        if len(args) != len(self.params):
            raise KernelMisuse(
                f"{self.name} takes {len(self.params)} arguments, the launch passes {len(args)}"
            )
        for i, (a, (c_type, pname)) in enumerate(zip(args, self.params, strict=True)):
            pointee = _pointee(c_type)
            where = f"{self.name} argument {i} ({c_type} {pname})"
            if pointee is not None:
                if not isinstance(a, np.ndarray):
                    raise KernelMisuse(f"{where}: an array is needed, got {type(a).__name__}")
                if a.dtype.name not in POINTEES[pointee]:
                    raise KernelMisuse(f"{where}: points to {pointee}, the array holds {a.dtype}")
            elif type(a) is not SCALARS[_scalar(c_type)]:
                raise KernelMisuse(
                    f"{where}: needs {SCALARS[_scalar(c_type)].__name__}, got {type(a).__name__}"
                )

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        threads = block[0] * block[1] * block[2]
        if not (1 <= threads <= 1024 and min(grid) >= 1 and 0 <= shared_mem <= 48 * 1024):
            raise KernelMisuse(f"{self.name}: launch grid {grid}, block {block}, {shared_mem} bytes shared")
        self._check(args)
        keep, pointers, copies = [], (ctypes.c_void_p * max(1, len(args)))(), []
        libc = ctypes.CDLL(None) if self.module.asan else None
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                address = a.__array_interface__["data"][0]
                if self.module.asan:  # an allocation exactly the span the array covers
                    lo = address + sum(min(0, (n - 1) * s) for n, s in zip(a.shape, a.strides, strict=True))
                    hi = address + sum(max(0, (n - 1) * s) for n, s in zip(a.shape, a.strides, strict=True))
                    size = (hi - lo + a.itemsize) if a.size else 0
                    libc.malloc.restype = ctypes.c_void_p
                    buf = libc.malloc(ctypes.c_size_t(max(size, 1)))
                    ctypes.memmove(buf, lo, size)
                    copies.append((buf, lo, size, a.flags.writeable))
                    address = buf + (address - lo)
                value = ctypes.c_void_p(address)
            else:
                value = CTYPES[type(a)](a)
            keep.append(value)
            pointers[i] = ctypes.addressof(value)
        error = ctypes.create_string_buffer(1024)
        stack = (256 if self.module.asan else 64) * 1024
        g, b = (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block)
        how, seed = ORDERS[self.module.order], ctypes.c_ulonglong(self.module.seed + self.launches)
        failed = self.fn(
            g, b, ctypes.c_size_t(shared_mem), how, seed, ctypes.c_size_t(stack), pointers, error, 1024
        )
        self.launches += 1
        for buf, lo, size, writeable in copies:
            if writeable:
                ctypes.memmove(lo, buf, size)
            libc.free(ctypes.c_void_p(buf))
        if failed:
            raise KernelMisuse(f"{self.name}: {error.value.decode()}")


def asan_environment() -> dict[str, str]:
    """os.environ for a child process whose kernels may be built with AddressSanitizer (libasan preloaded)."""
    lib = subprocess.run(
        ["g++", "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    options = "detect_leaks=0:abort_on_error=0:exitcode=86:allocator_may_return_null=1"
    return {**os.environ, "LD_PRELOAD": lib, "ASAN_OPTIONS": options}
