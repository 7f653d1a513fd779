#!/usr/bin/env bash
# The GPU checks of the Triton kernels, as one call on a lent CUDA machine (its own python3 with torch and triton):
#   1. the environment (GPU, driver, torch, triton);
#   2. tests/ops/test_triton.py compiled on the GPU: the interpreter cases plus the `gpu`-marked real sizes, every
#      measured error logged to errors.jsonl (tests/assertions.py, TITANS_ERROR_LOG);
#   3. bench/kernel.py: the memory layer (issue 5's configuration, bf16) and the update alone, JSON lines.
# Logs go to $OUT (the device tool's folder) or runs/gpu-check. Each step has its own time limit so the call ends
# inside its lease and a timed-out step still leaves the lines it printed.
#
#   OUT=runs/gpu-check bash bench/gpu_check.sh
#   TEST_S=150 LAYER_S=200 UPDATE_S=60 bash bench/gpu_check.sh   # per-step seconds
#
# titans-pytorch (the benchmark's third path) is not on the device image: when ./.whl holds its wheels (downloaded
# here with `pip download --no-deps` for the device's Python), they are installed to /tmp/site first.
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

xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)  # compilation is CPU-bound: compile kernel variants in parallel
TITANS_ERROR_LOG="$OUT/errors.jsonl" timeout "${TEST_S:-150}" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
  --durations=8 tests/ops/test_triton.py 2>&1 | tee "$OUT/pytest.log"

timeout "${LAYER_S:-200}" "$PY" bench/kernel.py 2>&1 | tee "$OUT/kernel_layer.jsonl"
timeout "${UPDATE_S:-60}" "$PY" bench/kernel.py --update-only --paths triton torch --lengths 4096 16384 \
  2>&1 | tee "$OUT/kernel_update.jsonl"

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
