#!/usr/bin/env bash
# benchmarks/gpu_benchmark.py as one prepared call on a machine with one GPU: installs the
# wheels brought along, prints the environment, runs the benchmark inside a time budget, and
# leaves gpu_benchmark.json, gpu_benchmark.png and gpu_benchmark.log in $OUT.
#
# The GPU machine needs Python with jax (CUDA), flax, optax, orbax-checkpoint, chex, etils,
# torch (CUDA), transformers and matplotlib; no TensorFlow and no network. A pure-Python package
# it lacks (ml_collections, which the trainer's config needs) travels as a wheel in the
# repository's .whl/ folder, which git ignores. Fetch it once on a machine with network, in the
# repository root (--python-version: the GPU machine's Python):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl ml_collections==1.1.0
#
# (its requirements, absl-py and PyYAML, are usually there already). Then copy the repository
# with its .whl/ folder to the GPU machine and run there, from the repository root, with a
# wall-clock limit of 540 s on the whole command:
#
#   bash benchmarks/gpu_run.sh
#
# The benchmark skips parts that would end after TIME_BUDGET_S (default 420 s) and is stopped
# at HARD_LIMIT_S (default 470 s); the JSON and the plot are rewritten after every part, so a
# stop keeps what finished. Arguments are passed on to gpu_benchmark.py, e.g. to measure only
# what a first run skipped, with a limit of 270 s:
#
#   TIME_BUDGET_S=200 HARD_LIMIT_S=230 bash benchmarks/gpu_run.sh --variants poolformer_m36 \
#       --modes inference --batch-sizes 1024
#
# A dry run on a CPU (a minute; tiny models, torch.compile through its aot_eager backend):
#
#   JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= OUT=/tmp/gpu_dry bash benchmarks/gpu_run.sh --tiny
#
# Variables: OUT (default benchmarks/results/gpu), PYTHON (default python3), TIME_BUDGET_S,
# HARD_LIMIT_S.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
TIME_BUDGET_S=${TIME_BUDGET_S:-420}
HARD_LIMIT_S=${HARD_LIMIT_S:-470}

main() {
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -srm), $(nproc) cores"
  if compgen -G ".whl/*.whl" >/dev/null; then
    local site
    site=$(mktemp -d)
    echo "== installing the wheels in .whl/ into $site: $(cd .whl && echo *.whl)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "== GPU"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  echo "== Python"
  "$PYTHON" - <<'EOF' || return 1
import importlib.metadata as md
import platform
import sys
print("python", platform.python_version(), sys.executable)
for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "chex", "etils", "ml_collections", "numpy", "torch",
             "transformers", "triton", "matplotlib"):
  try:
    print(f"  {dist} {md.version(dist)}")
  except md.PackageNotFoundError:
    print(f"  {dist} -")
EOF
  echo "== benchmark: time budget ${TIME_BUDGET_S} s, stopped at ${HARD_LIMIT_S} s"
  PYTHONUNBUFFERED=1 timeout -k 10 "$HARD_LIMIT_S" "$PYTHON" benchmarks/gpu_benchmark.py \
    --time-budget-s "$TIME_BUDGET_S" --out "$OUT/gpu_benchmark.json" "$@"
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "stopped at ${HARD_LIMIT_S} s: $OUT/gpu_benchmark.json holds the parts that finished"
  fi
  ls -l "$OUT"
  return "$rc"
}

mkdir -p "$OUT" || exit 1
main "$@" 2>&1 | tee "$OUT/gpu_benchmark.log"
exit "${PIPESTATUS[0]}"
