"""Sphinx extension for the tinyqwen book: links written for Jupyter also work in the book.

The chapters are the notebooks in notebooks/ (read from their .py text through the `notebooks` symlink), and they
link to each other the way Jupyter needs, by file: `[chapter 4](04-rope-yarn.ipynb)`. In the book that file is
not a page (the paired .ipynb is kept out of the source tree), so:

- a link to `NN-slug.ipynb` (optionally `#anchor`) becomes a link to the page `NN-slug`: a chapter notebook, or a
  placeholder page such as `10-numba` for a chapter that comes later;
- a relative link to a file of the repository, such as `../tinyqwen/rope.py`, is resolved from the notebook's real
  folder (notebooks/, not the symlink) and becomes a download link to that file, so the reader sees the code.

Anything else is left to MyST, and a link that resolves nowhere stays a warning (an error under `-W`).

It also drops repeated <script> entries from each page: sphinx-thebe (loaded by Jupyter Book) registers its inline
configuration script once per read of the sources, and a second copy of `const THEBE_JS_URL = ...` is a script error
in every page.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform

NOTEBOOK_LINK = re.compile(r"^(?:\./)?(\d\d-[A-Za-z0-9_.-]+?)\.ipynb$")


def page_for(stem: str, found_docs: set[str], refdoc: str) -> str | None:
    """The docname of the page called `stem`: the one beside `refdoc` if any, else the only one in the book.

    >>> page_for("04-rope-yarn", {"intro", "notebooks/04-rope-yarn"}, "notebooks/00-tour")
    'notebooks/04-rope-yarn'
    >>> page_for("10-numba", {"10-numba", "notebooks/00-tour"}, "notebooks/00-tour")
    '10-numba'
    >>> page_for("99-nothing", {"intro"}, "intro") is None
    True
    """
    beside = posix_join(posix_dirname(refdoc), stem)
    if beside in found_docs:
        return beside
    matches = sorted(d for d in found_docs if d.rsplit("/", 1)[-1] == stem)
    return matches[0] if len(matches) == 1 else None


def posix_dirname(docname: str) -> str:
    return docname.rsplit("/", 1)[0] if "/" in docname else ""


def posix_join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


class NotebookLinks(SphinxTransform):
    """Rewrite MyST's unresolved file links (pending_xref, reftype "myst") as described in the module docstring.

    Runs at read time, before Sphinx collects download files, so a rewritten download link is copied into the
    built site like any other.
    """

    default_priority = 100

    def apply(self, **kwargs) -> None:
        env = self.env
        docname = env.docname
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst":
                continue
            target = node.get("reftarget", "")
            if node.get("refdomain") == "doc":  # MyST already found a page (e.g. the .ipynb exists beside)
                continue
            path, _, anchor = target.partition("#")
            match = NOTEBOOK_LINK.match(path)
            if match:
                page = page_for(match.group(1), env.found_docs, docname)
                if page is not None:
                    node["refdomain"] = "doc"
                    node["reftarget"] = page
                    node["reftargetid"] = anchor or None
                continue
            repo_file = self.repository_file(path, docname)
            if repo_file is not None:
                node.replace_self(self.download(node, repo_file))

    def repository_file(self, path: str, docname: str) -> str | None:
        """`path` as seen from the document's real folder, relative to srcdir, if it is an existing file."""
        if not path or "://" in path or path.startswith(("/", "#")):
            return None
        real_folder = Path(self.env.doc2path(docname)).resolve().parent
        candidate = (real_folder / path).resolve()
        if not candidate.is_file():
            return None
        return "/" + os.path.relpath(candidate, Path(self.env.srcdir).resolve()).replace(os.sep, "/")

    @staticmethod
    def download(node: addnodes.pending_xref, target: str) -> addnodes.download_reference:
        ref = addnodes.download_reference(
            refdoc=node.get("refdoc"),
            refdomain=None,
            reftype="myst",
            refexplicit=node.get("refexplicit", True),
            reftarget=target,
        )
        ref.source, ref.line = node.source, node.line
        for child in node.children:
            ref += child.deepcopy()
        if not ref.children:
            ref += nodes.literal(target, target)
        return ref


def drop_repeated_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Keep the first of identical script entries (same file or inline body, same attributes)."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        key = (
            str(getattr(script, "filename", script) or ""),  # inline scripts: None or ""
            tuple(sorted((k, str(v)) for k, v in attributes.items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict:
    app.add_transform(NotebookLinks)
    app.connect("html-page-context", drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
