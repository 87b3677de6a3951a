"""Numba's on-disk kernel cache, made to notice a change anywhere in this package.

Every kernel here is `@njit(cache=True)`: its machine code is saved beside the source (or in Numba's user cache)
and loaded by the next process, which saves the seconds to minutes a compile takes. Numba decides whether a saved
kernel is still good by a stamp of ONE file, the one the function is written in. But a kernel's machine code also
holds every function it calls from other files, compiled into it: quant.py's GEMV inlines avx2.py's row dots,
decode_layer.py inlines phases.py's counters and decode_tiles.py's tiles. Edit avx2.py alone and quant.py's saved GEMV
still holds the old row dot; nothing recompiles it. Seen for real: a faster row dot that seemed to change nothing
until the cache was deleted by hand. A learner who edits a kernel, or anyone who upgrades tinyqwen, would meet the
same silent staleness, and a changed result would stay wrong, not just slow.

The fix: the stamp of a kernel in this package also carries a digest of every source file of the package, so any
edit here invalidates every saved kernel of the package (they recompile once). Numba lets a program name its own
cache "locators" (the classes that say where a function's cache lives and what its stamp is) in
`numba.config.CACHE_LOCATOR_CLASSES`; `install()`, run when this module is imported, puts this module's three in front of Numba's own list. They accept
only this package's files and otherwise behave as Numba's (user-provided directory, beside the source, user-wide
directory), so every other function in the process is cached exactly as before. A list the user set wins, and a
Numba too old to have the setting keeps its per-file stamps (the kernels are then still correct after a clean
install, which rewrites every file).

The second half of this module loads those saved kernels lean (`install_lean_start`, also run on import): without
compiling Numba's runtime module through LLVM or installing its registries, which a saved kernel does not need
(~30 MiB less resident, and the first call ~10x sooner; see the comment above `LEAN_START_ENV`).

>>> len(package_digest(PACKAGE_DIR))  # a SHA-256 in hex
64
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def package_digest(package: Path) -> str:
    """SHA-256 over the names and bytes of every `.py` file directly in `package`, in name order."""
    h = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class PackageStamp:
    """Mixin for a Numba cache locator: only files of `package`, and their stamp carries the package's digest."""

    package: Path = PACKAGE_DIR

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            inside = Path(py_file).resolve().parent == cls.package
        except (OSError, TypeError):
            return None
        return super().from_function(py_func, py_file) if inside else None

    def get_source_stamp(self):
        return (super().get_source_stamp(), package_digest(self.package))


NAMES = ("PackageUserProvidedCacheLocator", "PackageInTreeCacheLocator", "PackageUserWideCacheLocator")


def locator_classes(mixin: type) -> list[type]:
    """`mixin` in front of each of Numba's three file-backed locators, in Numba's order of preference: user-provided
    directory (NUMBA_CACHE_DIR), beside the source, user-wide directory. Named as in NAMES, in `mixin`'s module."""
    from numba.core import caching

    bases = [getattr(caching, n, None) or getattr(caching, "_" + n) for n in NAMES_OF_NUMBA]
    return [
        type(name, (mixin, base), {"__module__": mixin.__module__})
        for name, base in zip(NAMES, bases, strict=True)
    ]


NAMES_OF_NUMBA = (
    "UserProvidedCacheLocator",
    "InTreeCacheLocator",
    "UserWideCacheLocator",
)  # older: "_" + name


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


PackageUserProvidedCacheLocator, PackageInTreeCacheLocator, PackageUserWideCacheLocator = locator_classes(
    PackageStamp
)


def install() -> bool:
    """Put this package's locators in front of Numba's; False where the user chose locators or Numba cannot."""
    from numba.core import caching, config

    if not hasattr(config, "CACHE_LOCATOR_CLASSES"):  # an older Numba: no such setting
        return False
    if config.CACHE_LOCATOR_CLASSES:  # the user's own list (NUMBA_CACHE_LOCATOR_CLASSES)
        return _dotted(PackageInTreeCacheLocator) in config.CACHE_LOCATOR_CLASSES
    ours = [PackageUserProvidedCacheLocator, PackageInTreeCacheLocator, PackageUserWideCacheLocator]
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # Numba's own list, in its order
    chosen = ",".join(_dotted(c) for c in ours + list(impl._locator_classes))
    # the environment too: Numba re-reads its settings from it when they change, and would drop the attribute alone
    os.environ["NUMBA_CACHE_LOCATOR_CLASSES"] = config.CACHE_LOCATOR_CLASSES = chosen
    return True


# --- A lean start: loading saved kernels without starting Numba's compiler ------------------------------------------
#
# Numba starts at the first call of any kernel, even one loaded from the cache: `Cache.load_overload` calls the target
# context's `refresh()`, which (1) compiles Numba's runtime module (NRT: refcount increments and decrements, a few
# atomics) through LLVM's whole optimizer and code generator, paging in ~20–28 MiB of libllvmlite's code, and
# (2) imports and installs every typing and lowering registry (numba.np.arraymath, linalg, random, typed dict ...:
# ~12 MiB of Python objects). A saved kernel needs neither: its machine code already holds the runtime functions it
# calls (Numba links the NRT module into every kernel before compiling it), and loading it runs no typing or
# lowering. What it needs is the C functions its machine code calls be known to LLVM's linker: Numba's C helpers
# (registered when the context is made), the runtime's C API (registered by `rtsys.initialize`), CPython's API and
# libc (in the process), the parallel runtime's (registered by the kernel's own reload hooks).
#
# So `install_lean_start()` changes two things, for this package's kernels only, and nothing in what runs:
#   - the NRT module is compiled the first time something needs it — a kernel compiled in this process links it —
#     instead of at the first load; `rtsys.initialize` still registers the runtime's C API at once.
#   - a saved kernel of this package is loaded without `refresh()` when every symbol its machine code leaves
#     undefined is already known (read from the object's ELF symbol table); otherwise (an unknown symbol, a format
#     that is not ELF, object mode) it refreshes and compiles the runtime module first, as Numba does. A compile,
#     later, refreshes as always; a saved function outside this package loads exactly as Numba loads it.
# Measured on the Q4_K_M 0.6B file (benchmarks/memory_breakdown.py): Numba's start 40 MiB → 10, the whole run's
# peak over the file 1.20 → 1.12. Set TINYQWEN_NUMBA_LEAN_START=0 for Numba's own start.

LEAN_START_ENV = "TINYQWEN_NUMBA_LEAN_START"


def undefined_symbols(obj: bytes) -> list[str] | None:
    """Names an ELF64 little-endian object file leaves undefined (needs from elsewhere); weak ones excluded.

    None when `obj` is not such a file (macOS's Mach-O, Windows's COFF: the caller then takes the safe path).
    The symbol table: section headers at e_shoff (e_shnum of e_shentsize bytes); a SHT_SYMTAB section's entries are
    24 bytes (st_name, st_info, st_other, st_shndx, st_value, st_size), names in the string table it links to;
    undefined = st_shndx 0 (SHN_UNDEF); binding = st_info >> 4 (1 global, 2 weak)."""
    import struct

    if obj[:6] != b"\x7fELF\x02\x01":  # magic, 64-bit, little-endian
        return None
    try:
        shoff, shentsize, shnum = (
            struct.unpack_from("<Q", obj, 0x28)[0],
            *struct.unpack_from("<HH", obj, 0x3A),
        )
        sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
        names = []
        for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
            if sh_type != 2:  # SHT_SYMTAB
                continue
            str_offset = sections[link][4]
            for at in range(offset, offset + size, entsize or 24):
                st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", obj, at)
                if st_shndx == 0 and st_name and st_info >> 4 != 2:
                    end = obj.index(b"\0", str_offset + st_name)
                    names.append(obj[str_offset + st_name : end].decode())
        return names
    except (struct.error, IndexError, ValueError, UnicodeDecodeError):
        return None


def _known_to_linker(payload) -> bool:
    """True when a saved kernel (a CompileResult's reduced tuple) can be loaded without Numba's registries."""
    import llvmlite.binding as ll

    try:
        (_, kind, data), objectmode, lifted, reload_init = payload[0], payload[4], payload[5], payload[7]
    except (TypeError, ValueError, IndexError):
        return False
    if kind != "object" or objectmode or lifted:
        return False
    for hook in reload_init:  # what Numba runs before loading it (the parallel runtime's start): idempotent
        hook()
    symbols = undefined_symbols(data[0])
    return symbols is not None and all(ll.address_of_symbol(s) is not None for s in symbols)


def _defer_runtime_compile() -> None:
    """Numba's runtime (`rtsys`): `initialize` registers the C API at once, the NRT module compiles when needed."""
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.runtime import nrt, nrtdynmod

    runtime = type(nrt.rtsys)
    numba_initialize, numba_library = runtime.initialize, runtime.library

    def initialize(self, ctx):
        if self._init:
            return
        with global_compiler_lock:
            compile_nrt = nrtdynmod.compile_nrt_functions
            nrtdynmod.compile_nrt_functions = lambda ctx: None  # Numba's initialize, less the compile
            try:
                numba_initialize(self, ctx)
            finally:
                nrtdynmod.compile_nrt_functions = compile_nrt
            self._deferred_context = ctx

    def library(self):
        if self._init and self._library is None:
            with global_compiler_lock:
                if self._library is None:
                    self._library = nrtdynmod.compile_nrt_functions(self._deferred_context)
        return numba_library.fget(self)

    initialize.__doc__ = (
        numba_initialize.__doc__ + "\n(tinyqwen: the NRT module compiles at `library`'s first use)"
    )
    runtime.initialize, runtime.library = initialize, property(library, doc=numba_library.__doc__)


def _load_without_refresh() -> None:
    """This package's saved kernels load without `refresh()` when their symbols are known (see above)."""
    from numba.core import caching
    from numba.core.runtime import nrt

    numba_load = caching.Cache.load_overload

    def load_overload(self, sig, target_context):
        if not isinstance(getattr(self._impl, "locator", None), PackageStamp):  # not ours: Numba's own path,
            nrt.rtsys.initialize(target_context)
            nrt.rtsys.library  # noqa: B018 (its runtime module compiled first, as Numba's own start does)
            return numba_load(self, sig, target_context)
        nrt.rtsys.initialize(target_context)  # the runtime's C API registered (its NRT module deferred)
        with self._guard_against_spurious_io_errors():  # Numba's _load_overload, with the check in the middle
            if not self._enabled:
                return None
            data = self._cache_file.load(self._index_key(sig, target_context.codegen()))
            if data is None:
                return None
            if not _known_to_linker(data):  # Numba's path: everything registered, the runtime module compiled
                target_context.refresh()
                nrt.rtsys.library  # noqa: B018
            return self._impl.rebuild(target_context, data)
        return None  # an I/O error the guard swallowed, as Numba

    load_overload.__doc__ = numba_load.__doc__
    load_overload.numba_load_overload = numba_load
    caching.Cache.load_overload = load_overload


def install_lean_start() -> bool:
    """Install the lean start described above; False (nothing changed) where it is switched off
    (TINYQWEN_NUMBA_LEAN_START=0) or this Numba lacks the internals it relies on."""
    if os.environ.get(LEAN_START_ENV, "1") == "0":
        return False
    from numba.core import caching
    from numba.core.runtime import nrt, nrtdynmod

    runtime, cache = type(nrt.rtsys), caching.Cache
    if getattr(cache.load_overload, "numba_load_overload", None) is not None:
        return True  # installed already
    needed = [
        hasattr(nrtdynmod, "compile_nrt_functions"),
        hasattr(nrt.rtsys, "_init"),
        isinstance(getattr(runtime, "library", None), property),
        all(hasattr(cache, a) for a in ("_guard_against_spurious_io_errors", "_index_key", "load_overload")),
    ]
    if not all(needed):
        return False
    _defer_runtime_compile()
    _load_without_refresh()
    return True


install()  # on import: tinyqwen.backends.numba imports this module before any of its kernels is defined
install_lean_start()
