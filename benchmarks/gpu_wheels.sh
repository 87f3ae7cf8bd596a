#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on a GPU machine that has torch, onnx and onnxruntime
# but no network and no diffusers (this project's device machines: Python 3.12, x86-64):
# diffusers and transformers at this project's pins (read from pyproject.toml) and this project.
#
#   bash benchmarks/gpu_wheels.sh .whl            # here (needs PyPI)
#   # there, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m benchmarks.gpu_check --out gpu-check
#
# ADGEN_WHEELS_PYTHON=3.11 targets another Python; ADGEN_WHEELS_ORT_GPU=1 adds onnxruntime-gpu
# (several hundred MB: more than a 64 MiB device transfer carries).
set -euo pipefail
dir=${1:-.whl}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${ADGEN_WHEELS_PYTHON:-3.12}
mkdir -p "$dir"
pins=$(python3 - "$root/pyproject.toml" "${ADGEN_WHEELS_ORT_GPU:-0}" <<'PY'
import re, sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
wanted = {"diffusers", "transformers"} | ({"onnxruntime-gpu"} if sys.argv[2] == "1" else set())
print(" ".join(p for p in extras["export"] + extras["gpu"] if re.split(r"[=<>\[ ]", p)[0] in wanted))
PY
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086 - $pins is a list of requirement strings
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    "${platforms[@]}" -d "$dir" $pins
# this project from a copy of the checkout's files (tracked and untracked, not ignored), so the
# build leaves no build/ folder behind in it
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git -C "$root" ls-files -z -co --exclude-standard | tar -C "$root" --null --ignore-failed-read -T - -cf - | tar -xf - -C "$src"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$src"
ls -l "$dir"
