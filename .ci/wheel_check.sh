#!/usr/bin/env bash
# The non-editable install: build the wheel (compiling hpd_fast._C), install it into a fresh
# environment that has only torch and triton (pinned as for .venv) plus the wheel's declared
# dependencies, and run it from outside the checkout: import, `hpd-fast info` (the compiled
# extension must be found), the shipped generator weights, `hpd-fast bench --list` and a smoke
# run of the quick suite. A missing dependency or package file fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "-- build the wheel"
.venv/bin/pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/hpd_fast-*.whl)
echo "$(basename "$wheel")"
python3 -m zipfile -l "$wheel" | grep -E "hpd_fast/(_C[^/]*\.so|generators/weights/)" \
    || { echo "wheel lacks _C or the generator weights"; exit 1; }

echo "-- install into a fresh environment (torch, triton, then the wheel and its dependencies)"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-compile torch==2.13.0 triton==3.8.0
"$work/venv/bin/pip" install -q --no-compile "$wheel"

echo "-- run it from outside the checkout"
cd "$work"
py="$work/venv/bin/python"
$py - "$repo" <<'PY'
import sys
from pathlib import Path

import hpd_fast
from hpd_fast._backend import backend_info

pkg = Path(hpd_fast.__file__).resolve().parent
assert Path(sys.argv[1]).resolve() not in pkg.parents, f"imported from the checkout: {pkg}"
assert "site-packages" in pkg.parts, pkg
assert backend_info()["cpp"]["available"], backend_info()["cpp"]
from hpd_fast.generators.io import pretrained

G = pretrained("digits")  # the shipped weights, read as package data
data = hpd_fast.load_dataset("digits")  # numpy + scikit-learn's bundled digits
print(f"hpd_fast {hpd_fast.__version__} from {pkg}; {type(G).__name__}, digits {data.train_images.shape}")
PY
"$work/venv/bin/hpd-fast" info
"$work/venv/bin/hpd-fast" bench --list
"$work/venv/bin/hpd-fast" bench --smoke --quiet --device cpu --out "$work/bench" > "$work/bench.log" \
    || { cat "$work/bench.log"; exit 1; }
test -s "$work/bench/quick.json" && test -s "$work/bench/quick.md"
echo "wheel check passed in $((SECONDS - start)) s"
