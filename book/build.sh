#!/usr/bin/env bash
# Build the book from a fresh clone: every chapter notebook executed (cwd notebooks/), warnings are errors, so a
# chapter whose cell raises, or a link that resolves nowhere, fails the build. Extra arguments go to
# `jupyter-book build` (e.g. --path-output DIR). The site lands in book/_build/html/ (or DIR/_build/html/).
set -euo pipefail
cd "$(dirname "$0")/.."
exec jupyter-book build --all -W --keep-going book/ "$@"
