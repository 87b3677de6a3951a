"""Numba's on-disk kernel cache, made to notice a change anywhere in this package.

Every kernel here is `@njit(cache=True)`: its machine code is saved beside the source (or in Numba's user cache)
and loaded by the next process, which saves the seconds to minutes a compile takes. Numba decides whether a saved
kernel is still good by a stamp of ONE file, the one the function is written in. But a kernel's machine code also
holds every function it calls from other files, compiled into it: quant.py's GEMV inlines avx2.py's row dots,
decode_layer.py inlines phases.py's counters and linear.py's tiles. Edit avx2.py alone and quant.py's saved GEMV
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


install()  # on import: tinyqwen.backends.numba imports this module before any of its kernels is defined
