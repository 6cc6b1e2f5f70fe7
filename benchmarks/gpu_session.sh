#!/usr/bin/env bash
# Verification ladder step 6 on a machine with an NVIDIA GPU and no package index, in phases
# that each stop within PHASE_LIMIT seconds (default 470: device calls are short and scarce).
# Everything lands in $OUT (default ./gpu-out), at most 8 files:
#   env.txt      GPU, driver, python/torch/cuda/triton versions, date
#   build.log    rnnkern._C built against the machine's torch
#   gpu.log      phase gpu: the gpu-marked tests (tests/test_gpu.py and every test's cuda
#                parametrisation: the Triton kernels compiled, on cuda tensors)
#   micro.log    phase micro: about a minute of benchmarks/run.py --quick --device cuda for the
#                scan, lstm (H=768 B=16 T=1024 bf16 against cuDNN), selective and mamba2 (against
#                mamba_ssm when installed) suites; micro.json their records
#   tests.log    phase tests: the rest of the suite (not gpu-marked)
#   aot.txt      phase aot: python -m rnnkern.aot on this machine's triton
#   results.json phase bench: the whole benchmark suite (plots are not kept: file limit)
# Usage, one device call per line (each well inside 8 minutes):
#   STEPS="build gpu" bash benchmarks/gpu_session.sh
#   STEPS="build micro" bash benchmarks/gpu_session.sh
#   STEPS="build tests aot" bash benchmarks/gpu_session.sh
#   STEPS="build bench" bash benchmarks/gpu_session.sh
# (build is quick when the extension is already built in the working tree.)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
limit=${PHASE_LIMIT:-470}
steps=" ${STEPS:-build gpu micro} "
wants() { [[ "$steps" == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
phase() {  # phase NAME LOG COMMAND...: runs COMMAND under the time limit, its output in LOG
  local name=$1 log=$2
  shift 2
  echo "::: $name ($(date -u +%H:%M:%SZ), limit ${limit}s)"
  timeout "$limit" "$@" >>"$out/$log" 2>&1
  local rc=$?
  tail -15 "$out/$log"
  [ "$rc" -eq 124 ] && echo "::: $name stopped at its ${limit}s limit"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
  git log -1 --format='rnnkern %h %s' 2>/dev/null
} 2>&1 | tee -a "$out/env.txt"

wants build && phase build build.log python3 setup.py build_ext --inplace
wants gpu && phase gpu gpu.log python3 -m pytest -q -rs -m gpu tests
micro() {  # the three quick suites, one results file
  for suite in scan lstm selective mamba2; do
    python3 benchmarks/run.py --quick --device cuda --suite "$suite" --out "$out/micro-$suite" || return 1
    mv "$out/micro-$suite/results.json" "$out/micro-$suite.json" && rm -rf "$out/micro-$suite"
  done
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = sorted(out.glob("micro-*.json"))
(out / "micro.json").write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in parts}, indent=1))
for p in parts:
    p.unlink()
PY
}
export out
export -f micro
wants micro && phase micro micro.log bash -c micro
wants tests && phase tests tests.log python3 -m pytest -q -rs -m "not gpu" tests
wants aot && phase aot aot.txt python3 -m rnnkern.aot
if wants bench; then
  phase bench bench.log python3 benchmarks/run.py --device cuda --out "$out/bench" "$@"
  [ -f "$out/bench/results.json" ] && mv "$out/bench/results.json" "$out/results.json"
  rm -rf "$out/bench" "$out/bench.log"
fi
exit $status
