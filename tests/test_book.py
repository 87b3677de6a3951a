"""The book (book/): its configuration, a tiny book built end to end, and the built site in headless Chromium.

Three layers:
- static checks of book/ (table of contents, placeholders, the bundled MathJax, the link extension);
- a tiny book built in a temporary folder by book/build.sh from the real book/ configuration and two small
  notebooks written here (math, a figure, printed output, links between chapters, to a later chapter's placeholder
  and to a repository file), opened in Chromium; plus a chapter that raises, which must fail the build;
- the real built site (book/_build/html, or $TINYQWEN_BOOK_HTML): every chapter page loads in Chromium, its
  internal links resolve, it shows its figures and outputs, and its math is rendered by MathJax. CI builds the book
  (book/build.sh) before running `pytest`; locally this layer skips, saying how to build, when there is no site.

A skipped test is never a pass: under CI (CI=true) a missing tool (jupyter-book, Playwright, Chromium) or a missing
site fails instead of skipping. Playwright drives the system's Chromium (Debian's `chromium`, or
$TINYQWEN_CHROMIUM); it never downloads a browser.
"""

from __future__ import annotations

import doctest
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from extras import require, unavailable

REPO = Path(__file__).resolve().parent.parent
BOOK = REPO / "book"
NOTEBOOKS = REPO / "notebooks"
CHAPTERS = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]-*.py"))
PLACEHOLDERS: tuple[str, ...] = ()  # book/NN-slug.md pages for chapters not written yet (none now)


def need(module: str):
    return require(module, "book")


def chromium() -> str:
    for candidate in (os.environ.get("TINYQWEN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    unavailable("no Chromium: apt-get install chromium (or set TINYQWEN_CHROMIUM to a Chromium binary)")


def jupyter_book() -> Path:
    beside = Path(sys.executable).parent / "jupyter-book"
    found = beside if beside.is_file() else shutil.which("jupyter-book")
    if not found:
        unavailable("jupyter-book is not installed: pip install -e '.[book]'")
    return Path(found)


# ------------------------------------------------------------------------------------------ static checks


def toc() -> dict:
    yaml = need("yaml")
    return yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))


def config() -> dict:
    yaml = need("yaml")
    return yaml.safe_load((BOOK / "_config.yml").read_text(encoding="utf-8"))


def test_toc_is_intro_then_chapters_in_order_then_placeholders():
    contents = toc()
    assert contents["format"] == "jb-book" and contents["root"] == "intro"
    entries = contents["chapters"]
    assert entries[0] == {"glob": "notebooks/[0-9][0-9]-*"}, "every notebooks/NN-*.py is a chapter, by number"
    assert [e["file"] for e in entries[1:]] == list(PLACEHOLDERS)


def test_placeholders_say_they_come_later_and_shadow_no_chapter():
    for name in PLACEHOLDERS:
        text = (BOOK / f"{name}.md").read_text(encoding="utf-8")
        assert text.startswith(f"# Chapter {int(name[:2])} · ") and "comes with its own issue" in text
        assert not list(NOTEBOOKS.glob(f"{name[:2]}-*.py")), (
            f"notebooks/{name[:2]}-*.py exists: replace the placeholder book/{name}.md by it in book/_toc.yml"
        )


def test_book_reads_the_notebooks_through_a_symlink():
    link = BOOK / "notebooks"
    assert link.is_symlink() and os.readlink(link) == "../notebooks", "book/notebooks -> ../notebooks"
    cfg = config()
    assert "notebooks/*.ipynb" in cfg["exclude_patterns"], "the paired .ipynb must stay out of the book"
    assert cfg["only_build_toc_files"] is True
    assert cfg["execute"]["run_in_temp"] is False and cfg["execute"]["allow_errors"] is False
    assert cfg["sphinx"]["config"]["nb_custom_formats"] == {".py": ["jupytext.reads", {"fmt": "py:percent"}]}


def test_build_script_treats_warnings_as_errors():
    script = (BOOK / "build.sh").read_text(encoding="utf-8")
    assert re.search(r"jupyter-book build .*-W", script) and "set -euo pipefail" in script


def test_mathjax_is_bundled_and_intact():
    """The book renders math offline from book/_extra/mathjax (npm mathjax@3.2.2, see book/vendor-mathjax.sh)."""
    folder = BOOK / "_extra" / "mathjax"
    cfg = config()["sphinx"]["config"]
    assert cfg["html_extra_path"] == ["_extra"]
    assert cfg["mathjax_path"] == "../mathjax/tex-mml-chtml.js"  # relative to _static/, i.e. <html>/mathjax/
    lines = (folder / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    assert len(lines) > 20
    for line in lines:
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    names = {line.split(maxsplit=1)[1] for line in lines}
    assert "./tex-mml-chtml.js" in names and "./output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff" in names
    assert "./input/tex/extensions/boldsymbol.js" in names  # autoloaded on demand


def test_link_extension_examples():
    need("sphinx")
    sys.path.insert(0, str(BOOK / "_ext"))
    try:
        import tinyqwen_book
    finally:
        sys.path.remove(str(BOOK / "_ext"))
    result = doctest.testmod(tinyqwen_book)
    assert result.attempted >= 3 and result.failed == 0
    assert tinyqwen_book.NOTEBOOK_LINK.match("04-rope-yarn.ipynb").group(1) == "04-rope-yarn"
    assert tinyqwen_book.NOTEBOOK_LINK.match("./10-numba.ipynb").group(1) == "10-numba"
    assert tinyqwen_book.NOTEBOOK_LINK.match("rope.ipynb") is None


# ------------------------------------------------------------------------------------------ Chromium


PAGE_FACTS = """() => {
  const main = document.querySelector("main") || document.body;
  const prose = main.cloneNode(true);
  prose.querySelectorAll("pre, code, mjx-container, script, style, .cell_output").forEach(e => e.remove());
  return {
    title: document.title,
    mjx: main.querySelectorAll("mjx-container").length,
    math: main.querySelectorAll(".math").length,
    unrendered: [...main.querySelectorAll(".math")].filter(e => !e.querySelector("mjx-container"))
                  .map(e => e.textContent.slice(0, 80)),
    raw_dollars: (prose.textContent.match(/\\$[^$\\n]{1,80}\\$/g) || []).slice(0, 5),
    images: [...main.querySelectorAll(".cell_output img")].map(i => [i.getAttribute("src"), i.naturalWidth]),
    outputs: [...main.querySelectorAll(".cell_output")]
               .map(e => [...e.querySelectorAll("pre")].map(p => p.textContent).join("\\n").trim()
                         || (e.querySelector("img") ? "<figure>" : ""))
               .filter(t => t),
    cells: main.querySelectorAll("div.cell").length,
    errors: main.querySelectorAll(".output.error, .output.traceback, .cell_output .ansi-red-fg").length,
    links: [...document.querySelectorAll("a[href]")].map(a => a.getAttribute("href")),
    nav: [...document.querySelectorAll("nav.bd-docs-nav a.reference.internal")].map(a => a.getAttribute("href")),
  };
}"""


class Browser:
    """One headless Chromium for the module; `visit` returns what a reader sees on a page, and what went wrong."""

    def __init__(self):
        sync_api = need("playwright.sync_api")
        self._playwright = sync_api.sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"]
        )
        self.page = self._browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed to load {r.url}"))
        self.page.on(
            "request",
            lambda r: (
                None
                if r.url.startswith(("file:", "data:", "blob:", "about:"))
                else self.problems.append(f"network request {r.url} (the book must work offline)")
            ),
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"script error {e}"))
        self.page.on(
            "console",
            lambda m: self.problems.append(f"console error {m.text}") if m.type == "error" else None,
        )

    def visit(self, html: Path) -> dict:
        self.problems.clear()
        response = self.page.goto(html.as_uri())
        assert response is None or response.ok, f"{html} did not load"
        try:  # MathJax, where the page loads it, has started and typeset the page
            self.page.wait_for_function(
                "() => !document.querySelector('script[src*=mathjax]')"
                " || (window.MathJax && MathJax.startup && MathJax.startup.promise)",
                timeout=20_000,
            )
            self.page.evaluate(
                "() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => 1) : 0"
            )
        except Exception as error:  # playwright's TimeoutError; the facts below say what the reader sees
            self.problems.append(f"MathJax did not start: {str(error).splitlines()[0]}")
        facts = self.page.evaluate(PAGE_FACTS)
        # late failures (fonts, images) belong to this page: wait until the page says they are done. (Chromium's
        # "network idle" signal, the obvious choice, sometimes never came for a file:// page on a busy 2-core
        # machine, with no request in flight: 30 s timeouts on pages that load in 2 s.)
        self.page.wait_for_function(
            "() => document.readyState === 'complete' && document.fonts.status === 'loaded'"
            " && Array.from(document.images).every(img => img.complete)",
            timeout=60_000,
        )
        facts["problems"] = list(self.problems)
        return facts

    def close(self):
        self._browser.close()
        self._playwright.stop()


@pytest.fixture(scope="module")
def browser():
    chromium()  # skip (or, in CI, fail) before starting Playwright
    b = Browser()
    yield b
    b.close()


def broken_links(html_root: Path, page: Path, hrefs: list[str]) -> list[str]:
    """Relative links of `page` whose file (or #anchor in it) does not exist in the built site."""
    broken = []
    for href in hrefs:
        parts = urlsplit(href)
        if parts.scheme or href.startswith("//"):
            continue  # https:, mailto:, javascript: — not part of the site
        target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if not target.is_file() or not target.is_relative_to(html_root.resolve()):
            broken.append(href)
        elif parts.fragment and target.suffix == ".html":
            text = target.read_text(encoding="utf-8")
            if f'id="{parts.fragment}"' not in text:
                broken.append(href)
    return broken


def pages(html_root: Path) -> list[Path]:
    """The site's pages a reader visits (not the generated index, search page or the redirecting index.html)."""
    skip = {"genindex.html", "search.html", "index.html"}
    return [p for p in sorted(html_root.rglob("*.html")) if p.name not in skip and "_static" not in p.parts]


def check_chapter(facts: dict, name: str, source: str):
    """What every chapter page must show, judged against its notebook's text."""
    assert not facts["problems"], f"{name}: {facts['problems']}"
    assert facts["errors"] == 0, f"{name}: a cell's output is an error"
    if "$" in source:  # the notebook has math: MathJax must have rendered every piece of it
        assert facts["mjx"] > 0 and facts["math"] > 0, f"{name}: no rendered math (mjx-container) on the page"
    assert not facts["unrendered"], f"{name}: math left unrendered: {facts['unrendered']}"
    assert not facts["raw_dollars"], f"{name}: raw $...$ in the page text: {facts['raw_dollars']}"
    if re.search(r"^\s*plt\.show\(\)", source, re.M):
        assert facts["images"], f"{name}: the notebook draws figures, but the page shows none"
    for src, width in facts["images"]:
        assert width and width > 0, f"{name}: figure {src} did not load"
    if re.search(r"^\s*print\(", source, re.M):
        assert facts["outputs"], f"{name}: the notebook prints, but the page shows no output"


# ------------------------------------------------------------------------------------------ a tiny book

HEADER = """\
# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---
"""

TINY = {
    "00-tour": HEADER
    + textwrap.dedent(
        """
        # %% [markdown]
        # # 0 · A tour
        #
        # Inline math $x^2 + y_i$ and display math:
        #
        # $$\\mathrm{softmax}(z)_i = \\frac{e^{z_i}}{\\sum_j e^{z_j}}$$
        #
        # Next: [chapter 1](01-tokenization.ipynb); the repository's [pyproject.toml](../pyproject.toml).

        # %%
        from pathlib import Path

        print("cwd:", Path.cwd().resolve().name)
        assert (Path.cwd().resolve().parent / "pyproject.toml").is_file()

        # %%
        import matplotlib.pyplot as plt

        plt.plot([0, 1, 2, 3], [0, 1, 4, 9])
        plt.title("squares")
        plt.xlabel("x")
        plt.ylabel("$x^2$")
        plt.show()
        """
    ),
    "01-tokenization": HEADER
    + textwrap.dedent(
        """
        # %% [markdown]
        # # 1 · Tokenization
        #
        # Back to [the tour](00-tour.ipynb). $\\boldsymbol{v}$ needs a MathJax extension loaded on demand.

        # %%
        print("tokens:", 2 + 2)
        """
    ),
}

BROKEN = HEADER + textwrap.dedent(
    """
    # %% [markdown]
    # # 2 · Broken

    # %%
    raise RuntimeError("this chapter is broken")
    """
)


def tiny_repo(root: Path, chapters: dict[str, str]) -> Path:
    """A repository-shaped folder: pyproject.toml, the real book/ (without its build), notebooks/ with `chapters`."""
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'tiny'\n", encoding="utf-8")
    shutil.copytree(
        BOOK, root / "book", symlinks=True, ignore=shutil.ignore_patterns("_build", "__pycache__")
    )
    for name, text in chapters.items():
        (root / "notebooks" / f"{name}.py").write_text(text, encoding="utf-8")
    return root


def build(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{jupyter_book().parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        ["bash", str(root / "book" / "build.sh")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> Path:
    for module in ("myst_nb", "jupytext", "matplotlib"):
        need(module)
    root = tiny_repo(tmp_path_factory.mktemp("tiny-book"), TINY)
    run = build(root)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return root / "book" / "_build" / "html"


def test_tiny_book_builds_and_reads_well(tiny_site, browser):
    assert [p.name for p in sorted((tiny_site / "notebooks").glob("*.html"))] == [
        "00-tour.html",
        "01-tokenization.html",
    ]
    intro = browser.visit(tiny_site / "intro.html")
    assert not intro["problems"], intro["problems"]
    assert intro["nav"] == [
        "#",
        "notebooks/00-tour.html",
        "notebooks/01-tokenization.html",
    ]
    tour = browser.visit(tiny_site / "notebooks" / "00-tour.html")
    check_chapter(tour, "00-tour", TINY["00-tour"])
    assert tour["mjx"] >= 2 and len(tour["images"]) == 1
    assert "cwd: notebooks" in tour["outputs"], "notebooks run with notebooks/ as their working directory"
    assert "<figure>" in tour["outputs"]
    hrefs = set(tour["links"])
    assert "01-tokenization.html" in hrefs, "links to NN-slug.ipynb become page links"
    assert any(h.startswith("../_downloads/") and h.endswith("/pyproject.toml") for h in hrefs)
    tokenization = browser.visit(tiny_site / "notebooks" / "01-tokenization.html")
    check_chapter(tokenization, "01-tokenization", TINY["01-tokenization"])
    assert "00-tour.html" in tokenization["links"]
    for page in pages(tiny_site):
        facts = browser.visit(page)
        assert not facts["problems"], f"{page.relative_to(tiny_site)}: {facts['problems']}"
        assert not broken_links(tiny_site, page, facts["links"]), page


def test_a_chapter_that_raises_fails_the_build(tmp_path):
    for module in ("myst_nb", "jupytext"):
        need(module)
    root = tiny_repo(tmp_path, {"00-tour": TINY["00-tour"], "02-broken": BROKEN})
    run = build(root)
    assert run.returncode != 0
    assert "02-broken" in run.stdout + run.stderr and "this chapter is broken" in run.stdout + run.stderr


# ------------------------------------------------------------------------------------------ the real book


@pytest.fixture(scope="module")
def site() -> Path:
    html = Path(os.environ.get("TINYQWEN_BOOK_HTML") or BOOK / "_build" / "html").resolve()
    if not (html / "intro.html").is_file():
        unavailable(f"no built book at {html}: build it with book/build.sh (CI does, before pytest)")
    built = (html / "intro.html").stat().st_mtime
    stale = [c for c in CHAPTERS if (NOTEBOOKS / f"{c}.py").stat().st_mtime > built]
    if stale:
        unavailable(f"the book at {html} is older than notebooks {stale}: rebuild it with book/build.sh")
    return html


def test_book_lists_every_chapter_in_order(site, browser):
    intro = browser.visit(site / "intro.html")
    assert not intro["problems"], intro["problems"]
    want = ["#"] + [f"notebooks/{c}.html" for c in CHAPTERS] + [f"{p}.html" for p in PLACEHOLDERS]
    assert intro["nav"] == want


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_shows_figures_outputs_and_math(site, browser, chapter):
    page = site / "notebooks" / f"{chapter}.html"
    assert page.is_file(), f"{chapter} has no page in the book"
    facts = browser.visit(page)
    source = (NOTEBOOKS / f"{chapter}.py").read_text(encoding="utf-8")
    check_chapter(facts, chapter, source)
    assert facts["cells"] > 0 and facts["outputs"], f"{chapter}: no code cells or outputs on the page"
    assert not broken_links(site, page, facts["links"]), f"{chapter}: broken links"
    if chapter == next(
        (c for c in CHAPTERS if c.startswith("04-")), CHAPTERS[0]
    ):  # chapter 4 if there is one
        browser.page.screenshot(path=str(site.parent / f"screenshot-{chapter[:2]}.png"), full_page=False)


def test_every_page_loads_and_links_resolve(site, browser):
    assert "intro.html" in (site / "index.html").read_text(
        encoding="utf-8"
    )  # index.html redirects to the intro
    for page in pages(site):
        facts = browser.visit(page)
        assert not facts["problems"], f"{page.relative_to(site)}: {facts['problems']}"
        assert not broken_links(site, page, facts["links"]), f"{page.relative_to(site)}: broken links"
