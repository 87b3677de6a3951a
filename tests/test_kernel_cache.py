"""backends/numba/kernel_cache.py: a saved kernel is recompiled when ANY file of its package changes.

Numba stamps a cached kernel with its own file only; a kernel that calls a function of another file holds that
function's old machine code after the other file is edited. These tests run the real Numba cache in a
subprocess on a two-file package, edit the called file, and check the caller's result changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

from tinyqwen.backends.numba import kernel_cache, norm_rope  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_the_packages_kernels_are_stamped_with_the_whole_package():
    locator = norm_rope._rms_norm._cache._impl.locator
    assert isinstance(locator, kernel_cache.PackageStamp)
    own, package = locator.get_source_stamp()
    assert package == kernel_cache.package_digest(kernel_cache.PACKAGE_DIR)
    assert own is not None  # Numba's stamp of the file itself is kept beside it


def test_the_digest_changes_when_any_file_of_the_package_changes(tmp_path):
    for path in kernel_cache.PACKAGE_DIR.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    before = kernel_cache.package_digest.__wrapped__(tmp_path)
    assert before == kernel_cache.package_digest(kernel_cache.PACKAGE_DIR)  # same bytes, same digest
    avx2 = tmp_path / "avx2.py"
    avx2.write_text(avx2.read_text() + "\n# edited\n")
    edited = kernel_cache.package_digest.__wrapped__(tmp_path)
    (tmp_path / "new_kernel.py").write_text("x = 1\n")
    added = kernel_cache.package_digest.__wrapped__(tmp_path)
    assert len({before, edited, added}) == 3


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def _run(tmp_path: Path, locators: str) -> str:
    script = textwrap.dedent(
        f"""
        import tinyqwen.backends.numba  # installs the package's locators; then this test's own
        from numba.core import config
        config.CACHE_LOCATOR_CLASSES = {locators!r}
        import pkg.b
        print(pkg.b.twice(), type(pkg.b.twice._cache._impl.locator).__name__)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "NUMBA_CACHE_DIR": ""}
    env.pop("NUMBA_CACHE_LOCATOR_CLASSES", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_editing_a_called_file_recompiles_its_caller(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg / "a.py", "from numba import njit\n\n@njit(cache=True)\ndef value():\n    return 1\n")
    _write(
        pkg / "b.py",
        "from numba import njit\nfrom pkg.a import value\n\n@njit(cache=True)\ndef twice():\n    return 2 * value()\n",
    )
    _write(
        tmp_path / "lc.py",
        """
        from pathlib import Path
        from tinyqwen.backends.numba.kernel_cache import PackageStamp, locator_classes

        class Stamp(PackageStamp):
            package = Path(__file__).resolve().parent / "pkg"

        PackageUserProvidedCacheLocator, PackageInTreeCacheLocator, PackageUserWideCacheLocator = locator_classes(Stamp)
        """,
    )
    locators = "lc.PackageInTreeCacheLocator,numba.core.caching.InTreeCacheLocator"
    assert _run(tmp_path, locators) == ["2", "PackageInTreeCacheLocator"]
    assert list((pkg / "__pycache__").glob("b.twice-*.nbi")), "the caller's kernel was saved"
    # edit only the called file (a different size, so Python's own .pyc check sees it too)
    _write(pkg / "a.py", "from numba import njit\n\n@njit(cache=True)\ndef value():\n    return 37\n")
    # b.py is untouched, yet its saved kernel must be recompiled with the new value(). (With Numba's own locator
    # alone, numba 0.68, the same run prints 2: b's saved kernel, value() = 1 compiled in.)
    assert _run(tmp_path, locators)[0] == "74"


def test_functions_outside_the_package_keep_numbas_own_cache(tmp_path):
    _write(
        tmp_path / "outside.py", "from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import outside
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("outside", None)
    locator = outside.f._cache._impl.locator
    assert not isinstance(locator, kernel_cache.PackageStamp)
    assert type(locator).__name__ == "InTreeCacheLocator"
