#!/usr/bin/env bash
# Build the book from a fresh clone: every chapter notebook executed (cwd notebooks/), warnings are errors, so a
# chapter whose cell raises, or a link that resolves nowhere, fails the build. Extra arguments go to
# `jupyter-book build` (e.g. --path-output DIR). The site lands in book/_build/html/ (or DIR/_build/html/).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v jupyter-book >/dev/null 2>&1; then
    echo "book/build.sh: jupyter-book is not installed: pip install -e \".[book]\"" >&2
    exit 1
fi
exec jupyter-book build --all -W --keep-going book/ "$@"
