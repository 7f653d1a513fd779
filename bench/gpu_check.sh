#!/usr/bin/env bash
# The GPU checks of the Triton kernels, as one call on a lent CUDA machine (its own python3 with torch and triton):
#   1. the environment (GPU, driver, torch, triton);
#   2. bench/kernel.py: the memory layer (its default CUDA configuration, bf16) and the update alone, JSON lines;
#   3. tests/ops/test_triton.py compiled on the GPU: the interpreter cases plus the `gpu`-marked real sizes, every
#      measured error logged to errors.jsonl (tests/assertions.py, TITANS_ERROR_LOG).
# Logs go to $OUT (the device tool's folder) or runs/gpu-check. Each step has its own time limit so the call ends
# inside its lease and a timed-out step still leaves the lines it printed. Budget for compilation: on the H200 of
# 2026-11-26 the first pass of the depth-2 bf16 kernels took 58 s (each new specialisation, e.g. a length that is
# not a multiple of 16, compiles again), and 34 of the 38 tests finished in 140 s with 8 xdist workers.
#
#   OUT=runs/gpu-check bash bench/gpu_check.sh
#   LAYER_S=240 UPDATE_S=90 TEST_S=200 bash bench/gpu_check.sh   # per-step seconds (the defaults)
#
# titans-pytorch (the benchmark's third path) is not on the device image: when ./.whl holds its wheels (downloaded
# here for the device's Python 3.12), they are installed to /tmp/site first. The wheels used on 2026-11-26:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl titans-pytorch==0.5.5 \
#     assoc-scan==0.0.6 axial_positional_embedding==0.3.12 einx==0.4.3 hyper-connections==0.4.11 \
#     rotary-embedding-torch==0.9.1 tensordict==0.15.3 x-transformers==2.31.10 accelerated-scan==0.3.1 \
#     frozendict==2.5.1 torch-einops-utils==0.2.0 pyvers==0.2.3 loguru==0.7.3
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
                                    torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'
} 2>&1 | tee "$OUT/env.txt"

timeout "${LAYER_S:-240}" "$PY" bench/kernel.py --lengths 4096 16384 65536 --min-time 0.5 2>&1 | tee "$OUT/kernel_layer.jsonl"
timeout "${UPDATE_S:-90}" "$PY" bench/kernel.py --update-only --paths triton torch --lengths 4096 16384 --min-time 0.5 \
  2>&1 | tee "$OUT/kernel_update.jsonl"

xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)  # compilation is CPU-bound: compile kernel variants in parallel
TITANS_ERROR_LOG="$OUT/errors.jsonl" timeout "${TEST_S:-200}" "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark "${xdist[@]}" \
  --durations=8 tests/ops/test_triton.py 2>&1 | tee "$OUT/pytest.log"

# Summary last (the device tool returns the end of the output): the worst error margin per test, then the rates.
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
worst = {}
if (out / "errors.jsonl").exists():
    for line in (out / "errors.jsonl").read_text().splitlines():
        r = json.loads(line)
        test = r["test"].split("::")[-1].split(" ")[0]
        margin = r["rel_rms"] / r["tol"] if r["tol"] else 0.0
        if margin >= worst.get(test, (0.0,))[0]:
            worst[test] = (margin, r["name"], r["rel_rms"], r["tol"])
for test, (margin, name, rel, tol) in sorted(worst.items()):
    print(f"{test[:70]:70s} worst {name} rel {rel:.1e} tol {tol:.0e} ({margin:.0%})")
for name in ("kernel_layer.jsonl", "kernel_update.jsonl"):
    for line in (out / name).read_text().splitlines() if (out / name).exists() else []:
        if line.startswith("{"):
            r = json.loads(line)
            rate = r.get("tokens_per_s", r.get("error", r.get("skipped")))
            print(r["level"], r["path"], r["seq"], rate, r.get("ms_per_pass"), r.get("peak_mem_mib"))
EOF
