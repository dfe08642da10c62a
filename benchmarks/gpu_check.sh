#!/usr/bin/env bash
# The GPU check: one command that installs the package, runs the test suite on the GPU, every
# GPU benchmark, the training pipeline on the GPU and a sweep of the kernels' launch parameters,
# and writes the results as JSON (the README's GPU figures come from these files).
#
#   bash benchmarks/gpu_check.sh                          # results in ${OUT_DIR:-${OUT:-gpu_results}}/
#   ONLY=gpu-info,bench-attention-goal bash benchmarks/gpu_check.sh  # a subset of the steps, by name
#   ARCHIVE=results.tar.gz bash benchmarks/gpu_check.sh   # also pack the results after every step
#
# Written there: gpu.json (card, driver, versions), steps.json (status and seconds per step),
# tests.xml (junit), bench_<part>.json (pytest-benchmark), bench_results.jsonl (every
# benchmark result, appended as it finishes), train_cuda_<backend>/report.json (the
# pipeline on the GPU, 1 seed, 3 epochs), tune.jsonl (launch-parameter sweep), summary.md (time,
# peak memory, ratio to each baseline). Each step has a time limit (its second field, seconds).
# On an H200 the tests took 137 s (8 workers) and the distillation suite 88 s; the attention
# suite did not finish within 200 s there (slow baselines at 20 rounds, FlexAttention compiles),
# hence its parts, adaptive rounds and bench_results.jsonl. The ml-100k files must be in the
# cache ($SPNN_FAST_CACHE) for the train step: the GPU machine may have no network.
set -euo pipefail

cd "$(dirname "$0")/.."
export OUT_DIR="${OUT_DIR:-${OUT:-gpu_results}}"
export PY="${PYTHON:-python}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export SPNN_BENCH_JSONL="$OUT_DIR/bench_results.jsonl"  # each result as it finishes (_common.record)
mkdir -p "$OUT_DIR"

# "name|seconds|command": run in order, each in `bash -euo pipefail` under `timeout`; a failing
# step is recorded and the next steps still run; the script exits non-zero if any failed.
STEPS=(
  "install|150|\$PY -m pip install -q --no-build-isolation --no-deps -e ."
  "gpu-info|60|gpu_info"
  "tests|200|run_tests"
  "bench-attention-goal|120|bench attention_goal bench_attention.py -k 'L200-D64 and not flex'"
  "bench-attention-rest|200|bench attention_rest bench_attention.py -k 'not L200-D64 and not flex'"
  "bench-flex|200|bench flex bench_attention.py -k flex"
  "bench-distill|200|bench distill bench_distill.py"
  "train-cuda|180|train_cuda"
  "tune|150|\$PY benchmarks/tune_gpu.py --out \"\$OUT_DIR/tune.jsonl\" --budget-s 60"
)

run_tests() {  # TEST_PATHS (default tests/) and TESTS_K (a -k expression) pick a subset
  local args=(-q -rfEs -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml")
  # 8 workers when pytest-xdist is installed (Triton compiles dominate), 2 CPU threads each
  if "$PY" -c "import xdist" 2>/dev/null; then args+=(-n 8); export OMP_NUM_THREADS=2; fi
  if [[ -n "${TESTS_K:-}" ]]; then args+=(-k "$TESTS_K"); fi
  # shellcheck disable=SC2086
  "$PY" -m pytest ${TEST_PATHS:-tests} "${args[@]}"
}

bench() {  # bench NAME FILE [pytest args...]: one suite (or part of one) -> bench_NAME.json
  local name="$1" file="$2"
  shift 2
  "$PY" -m pytest "benchmarks/$file" -q -rs -p no:cacheprovider \
    --benchmark-json="$OUT_DIR/bench_$name.json" "$@"
}

train_cuda() {  # the pipeline on ml-100k on the GPU, 1 seed, 3 epochs: kernels where they apply
  # (overlapping windows since the H200 run: about 3x the windows per epoch, hence 180 s)
  for backend in auto torch; do  # auto: the Triton kernels (torch only where they cannot run)
    "$PY" -m spnn_fast train --device cuda --backend "$backend" --seeds 1 --epochs 3 \
      --out "$OUT_DIR/train_cuda_$backend" 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -n 25
  done
}

gpu_info() {  # the card's name as nvidia-smi gives it, and the versions that ran
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
    tee "$OUT_DIR/nvidia_smi.txt"
  "$PY" - <<'EOF'
import json, os, platform
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
with open(os.path.join(os.environ["OUT_DIR"], "nvidia_smi.txt")) as f:
    smi = [line.strip() for line in f if line.strip()]
info = {
    "nvidia_smi": smi,
    "card": smi[0].split(",")[0].strip() if smi else None,
    "torch_device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "triton": triton_version,
    "python": platform.python_version(),
}
with open(os.path.join(os.environ["OUT_DIR"], "gpu.json"), "w") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info))
EOF
}

summary() {  # steps.json + summary.md: per group, time, peak memory and ratio to the fast path
  "$PY" - <<'EOF'
import json, os
out = os.environ["OUT_DIR"]
steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, seconds = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "seconds": int(seconds)})
card = None
if os.path.exists(os.path.join(out, "gpu.json")):
    with open(os.path.join(out, "gpu.json")) as f:
        card = json.load(f).get("card")
with open(os.path.join(out, "steps.json"), "w") as f:
    json.dump({"card": card, "steps": steps, "seconds": sum(s["seconds"] for s in steps)}, f, indent=2)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(f"# GPU check on {card}\n\n")
EOF
  # Ratio tables of the results streamed as each benchmark finished (a part cut off by its time
  # limit keeps what it measured; its pytest-benchmark JSON stays empty).
  "$PY" benchmarks/report.py "$SPNN_BENCH_JSONL" | tee -a "$OUT_DIR/summary.md"
}
export -f gpu_info summary run_tests bench train_cuda

: >"$OUT_DIR/steps.tsv"
: >"$SPNN_BENCH_JSONL"  # this run's results only
names=",$(printf '%s\n' "${STEPS[@]}" | cut -d'|' -f1 | paste -sd,),"
for want in ${ONLY//,/ }; do
  if [[ "$names" != *",$want,"* ]]; then echo "ONLY: unknown step '$want'; steps:${names//,/ }" >&2; exit 2; fi
done
failed=0
start_all=$(date +%s)
for step in "${STEPS[@]}"; do
  name="${step%%|*}"
  rest="${step#*|}"
  limit="${rest%%|*}"
  cmd="${rest#*|}"
  if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]]; then continue; fi
  echo "=== [$name] $cmd (limit $limit s)"
  t0=$(date +%s)
  if timeout -k 10 "$limit" bash -euo pipefail -c "$cmd"; then status=ok; else status="failed (exit $?)"; failed=1; fi
  t1=$(date +%s)
  echo "=== [$name] $status in $((t1 - t0)) s (total $((t1 - start_all)) s)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((t1 - t0))" >>"$OUT_DIR/steps.tsv"
  if [[ -n "${ARCHIVE:-}" ]]; then tar czf "$ARCHIVE" -C "$OUT_DIR" . || true; fi
done

summary || failed=1
if [[ -n "${ARCHIVE:-}" ]]; then tar czf "$ARCHIVE" -C "$OUT_DIR" . || true; fi
exit "$failed"
