#!/usr/bin/env bash
# Verification ladder step 6 in one call, on a machine with an NVIDIA GPU and no package
# index: build rnnkern._C against the machine's torch (CUDA kernels included when nvcc is
# there), run the whole test suite on cuda tensors, then the benchmark suite. Everything
# lands in $OUT (default ./gpu-out): env.txt, build.log, tests.log, results.json, plots.
#   bash benchmarks/gpu_session.sh [extra arguments for benchmarks/run.py]
# STEPS picks phases where one call must stay short (a device command may be capped), e.g.
#   STEPS="build tests aot" bash benchmarks/gpu_session.sh
#   STEPS="build bench" bash benchmarks/gpu_session.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
steps=" ${STEPS:-build tests aot bench} "
wants() { [[ "$steps" == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
  nvcc --version | tail -1
} 2>&1 | tee "$out/env.txt"

if wants build; then
  echo "::: build"
  python3 setup.py build_ext --inplace >"$out/build.log" 2>&1 || { status=1; tail -30 "$out/build.log"; }
fi

if wants tests; then
  echo "::: tests (cuda tensors included)"
  python3 -m pytest -q -rs tests 2>&1 | tee "$out/tests.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wants aot; then
  echo "::: ahead-of-time compile report"
  python3 -m rnnkern.aot 2>&1 | tee "$out/aot.txt" | tail -20
fi

if wants bench; then
  echo "::: benchmarks"
  python3 benchmarks/run.py --device cuda --out "$out" "$@" || status=1
fi
exit $status
