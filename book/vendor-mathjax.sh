#!/usr/bin/env bash
# Re-create _extra/mathjax/ from the npm package mathjax@3.2.2 (only the files the book loads: ~1.9 MB of the
# package's 24 MB). Needs npm and the npm registry; the result is committed, so building the book never does this.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version=3.2.2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "mathjax@$version" >/dev/null && tar xzf "mathjax-$version.tgz")
src="$work/package/es5"
dst="$here/_extra/mathjax"
rm -rf "$dst"
mkdir -p "$dst/output/chtml/fonts" "$dst/input/tex"
cp "$src/tex-mml-chtml.js" "$dst/"                                  # TeX + MathML in, HTML-CSS out, menu
cp -r "$src/output/chtml/fonts/woff-v2" "$dst/output/chtml/fonts/"  # the TeX fonts it draws with
cp -r "$src/input/tex/extensions" "$dst/input/tex/"                 # loaded on demand (\boldsymbol, \cancel, ...)
rm "$dst/input/tex/extensions/all-packages.js"                      # a bundle of all of them: never loaded here
cp "$work/package/LICENSE" "$dst/LICENSE"
(cd "$dst" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
echo "mathjax@$version -> $dst ($(du -sh "$dst" | cut -f1))"
