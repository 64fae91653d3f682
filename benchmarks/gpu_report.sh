#!/usr/bin/env bash
# The GPU report in one command: bash benchmarks/gpu_report.sh [OUTDIR] (see benchmarks/gpu_report.py);
# OUTDIR defaults to $OUT (the device machine's output folder), else ./gpu_report.
# PYTHON picks the interpreter (default: python3); without a GPU it prints why and exits 0.
set -u
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" benchmarks/gpu_report.py "${@:-${OUT:-gpu_report}}"
