#!/usr/bin/env bash
# Every GPU number of benchmarks/README.md, in one command, with whatever Python and torch
# the node has (run from the repository root):
#
#     bash benchmarks/gpu.sh [OUT]            # on a GPU node: about 5 minutes on an H200
#     bash benchmarks/gpu.sh --quick [OUT]    # the CPU rehearsal: tiny shapes, about a minute
#
# It needs torch and numpy; TorchDEQ, scipy, pandas, matplotlib and pytest where a step
# uses them (a missing one is named, and that step is skipped). MLflow, Snakemake and DVC
# are never needed. Pure-Python wheels carried in a folder (TorchDEQ, say) are found with
# WHEELS=<folder>: they are installed there with pip --target and put on PYTHONPATH.
# Each step runs under its own timeout, so a partial run still reports; every CSV, JSON
# and log goes to OUT (default gpu-results/), and OUT/summary.md lists them.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=""
if [[ "${1:-}" == "--quick" ]]; then QUICK="--quick"; shift; fi
OUT="${1:-gpu-results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
if [[ -n "${WHEELS:-}" && -d "$WHEELS" ]]; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT/site" "$WHEELS"/*.whl \
        && export PYTHONPATH="$OUT/site:$PYTHONPATH"
fi

SUMMARY="$OUT/summary.md"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_S COMMAND...: run it, log to OUT/NAME.log, record ok / failed / timeout
step() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local how="ok"
    if [[ $rc == 124 || $rc == 137 ]]; then how="TIMEOUT after ${limit} s"
    elif [[ $rc != 0 ]]; then how="FAILED (exit $rc)"; fi
    note "- $name: $how, $((SECONDS - t0)) s (log: $name.log)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
}

note "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)${QUICK:+ (CPU rehearsal, --quick)}"
note ""
# the versions (into the summary), then one line "probe DEVICE MISSING,PACKAGES" for the
# steps below: one Python process asks it all (each import of torch costs seconds)
PROBE=$("$PY" - <<'EOF'
import importlib, platform, subprocess
print(f"- python {platform.python_version()}, commit "
      + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip())
device = "cpu"
try:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}")
except ImportError:
    print("- torch: MISSING (nothing can run)")
from importlib.metadata import PackageNotFoundError, version
missing = []
for name in ("numpy", "scipy", "pandas", "matplotlib", "pytest", "torchdeq"):
    try:
        importlib.import_module(name)
        print(f"- {name} {version(name)}")
    except ImportError:
        missing.append(name)
        print(f"- {name}: MISSING (the steps that need it are skipped)")
    except PackageNotFoundError:
        print(f"- {name} (version unknown)")
print("probe", device, ",".join(missing) or "-")
EOF
)
grep -v '^probe ' <<< "$PROBE" | tee -a "$SUMMARY"
read -r _ DEV MISSING <<< "$(grep '^probe ' <<< "$PROBE")"
have() { [[ ",$MISSING," != *",$1,"* ]]; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader | sed 's/^/- nvidia-smi: /' | tee -a "$SUMMARY"
note ""

step solve_profile 120 "$PY" -m benchmarks.gpu_check solve-profile --out "$OUT" $QUICK
step train_step 150 "$PY" -m benchmarks.gpu_check train-step --out "$OUT" $QUICK
step resume 120 "$PY" -m benchmarks.gpu_check resume --out "$OUT" $QUICK
if [[ -n "$QUICK" ]]; then
    # the rehearsal's backward runs: one k, no figure (tests/test_benchmarks.py draws one)
    LARGE=(--quick --config large_cifar --batch 2 --image-size 8 --repeats 1 --ks 2 --no-figure)
    SMALL=(--quick --config small_imagenet --batch 2 --image-size 32 --repeats 1 --ks 2
           --no-figure)
    PAIRS=8
else
    LARGE=(--config large_cifar --batch 32 --image-size 32 --f-thres 18 --b-thres 20
           --lam 0.5 --ks 1 5 10 --repeats 3)
    SMALL=(--config small_imagenet --batch 16 --image-size 224 --f-thres 26 --b-thres 27
           --lam 0.6 --ks 5 --repeats 3)
    PAIRS=250
fi
# the paper shapes against TorchDEQ; our solves read the host once and replay F from a graph.
# Each into its own folder (backward.csv, summary.json, the figure): the two large_cifar
# folders are what the report's backward-speed claims read from results/benchmarks/
# (pipeline/figures/reference.yaml); copy them there.
for run in large_cifar_fixed large_cifar_tol small_imagenet; do
    if have torchdeq && have matplotlib; then
        case $run in
            large_cifar_fixed) ARGS=("${LARGE[@]}") ;;
            large_cifar_tol) ARGS=("${LARGE[@]}" --ks 5 --f-tol 1e-3 --b-tol 1e-3) ;;
            small_imagenet) ARGS=("${SMALL[@]}") ;;
        esac
        step "backward_$run" 150 "$PY" -m benchmarks.backward "${ARGS[@]}" \
            --device "$DEV" --no-diagnostics --no-ddp --check-every 0 --graph \
            --out-csv "$OUT/backward_$run/backward.csv" --out-fig "$OUT/backward_$run/backward"
    else
        note "- backward_$run: skipped (needs torchdeq and matplotlib)"
    fi
done
step deq_transformer 120 "$PY" -m benchmarks.backward --config deq_transformer \
    ${QUICK:---shape paper} --device "$DEV" --repeats 3 --out-csv "$OUT/deq_transformer.csv"
if have pandas && have matplotlib; then
    step synthetic 90 "$PY" -m benchmarks.synthetic --device "$DEV" \
        ${QUICK:+--quick} --pairs "$PAIRS" --repeats 3 \
        --out-csv "$OUT/synthetic.csv" --out-fig "$OUT/synthetic"
else
    note "- synthetic: skipped (needs pandas and matplotlib)"
fi
if have pytest; then
    step cuda_tests 120 "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -m gpu \
        -o addopts="" tests/test_host_syncs.py tests/test_synthetic.py
else
    note "- cuda_tests: skipped (needs pytest)"
fi
note ""
note "Files in $OUT: $(cd "$OUT" && ls | grep -v -e '^site$' | tr '\n' ' ')"
