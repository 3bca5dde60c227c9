#!/usr/bin/env bash
# bash launch/gpu_check.sh OUT_DIR
#
# The one prepared GPU check (issue 11, part 7; benchmarks/gpu_check.py says what it checks) on a borrowed
# H100/H200 with no network: no pip, Blues imported from this checkout, deepspeed never imported. Writes
# OUT_DIR/gpu_check.jsonl (one JSON row per check), OUT_DIR/gpu_check.log (the printed lines) and
# OUT_DIR/nvidia_smi.txt: three files, inside the device tool's limits (8 files, 2 folders deep).
# Exit status: gpu_check.py's (0 when every correctness row passed, 1 otherwise), 124 if it ran past
# the hard limit below.
#
# Time: the check skips its remaining steps after --budget_s 420 s; `timeout` stops it at 470 s whatever
# happens, inside the device tool's 8 minutes a command (480 s) with the start of Python and the copies.
# Measured on one H200 (2026-11-28), Triton compiles included (a fresh machine has no Triton cache): 110 s
# for the whole check; the 42 gpu-marked tests took another 92 s (tests/kernels, tests/test_model.py -m gpu).
#
# The device tool's call (one call; no carry needed: the tool copies the tracked and untracked files):
#   run(command='bash launch/gpu_check.sh "$OUT"', timeout_s=540)
# then read the rows under the reply's files_at, and call give_back unless you rerun at once.
# Before spending device minutes, the same script runs on a CPU in seconds:
#   python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke      (tests/test_gpu_check.py)
set -uo pipefail

out_dir=${1:?usage: launch/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out_dir"
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/blues_triton_cache}

nvidia-smi >"$out_dir/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$out_dir/nvidia_smi.txt"
timeout -k 10 470 python3 benchmarks/gpu_check.py --out "$out_dir" --budget_s 420 2>&1 | tee "$out_dir/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "launch/gpu_check.sh: exit $rc"
exit "$rc"
