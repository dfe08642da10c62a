#!/usr/bin/env bash
# The GPU check: one command that installs the package, measures the headline comparisons first
# (benchmarks/gpu_quick.py, each result written as it finishes), then runs the GPU tests (fp32,
# fp16, bf16), and in the full run also the other comparisons and the main job's teacher on the
# GPU. Every figure names the card.
#
#   bash benchmarks/gpu_check.sh --quick        # under 5 minutes: install, headline, GPU tests
#   bash benchmarks/gpu_check.sh                # under 8 minutes: + more comparisons, training
#   bash benchmarks/gpu_check.sh --dry-run      # print the steps and their time limits, run none
#   ONLY=gpu-info,bench-headline bash benchmarks/gpu_check.sh   # a subset of the steps, by name
#   ONLY=tune bash benchmarks/gpu_check.sh      # the launch-parameter sweep (not in the default runs)
#   ARCHIVE=results.tar.gz bash benchmarks/gpu_check.sh   # also pack the results after every step
#
# Results go to ${OUT_DIR:-${OUT:-gpu_results}}/: gpu.json (card, driver, versions), quick.json
# (the summary {"card", "comparisons": [{op, shape, mode, ours_ms, baseline, baseline_ms}],
# "skipped"}, also copied to benchmarks/results/gpu_<card>/quick.json), quick.jsonl (every result
# with its peak memory), tests.xml (junit), train_cuda_<backend>/ (the full run's training),
# steps.json (status and seconds per step) and summary.md (the comparisons as a table).
# Each step runs under `timeout` with its own limit (second field, seconds; the sum over a run's
# steps, with the grace `timeout` allows each, stays inside the run's limit); a failing step is
# recorded and the next steps still run; the script exits non-zero if any failed. The ml-100k
# files must be in the cache ($SPNN_FAST_CACHE) for the training step: the GPU machine may have
# no network.
set -euo pipefail

cd "$(dirname "$0")/.."
QUICK=0
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (--quick, --dry-run, --help)" >&2; exit 2 ;;
  esac
done

export OUT_DIR="${OUT_DIR:-${OUT:-gpu_results}}"
ONLY="${ONLY:-}"
export PY="${PYTHON:-python}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
GRACE=5 # seconds `timeout` waits after its signal before it kills a step

# "name|seconds|command": run in order, each in `bash -euo pipefail` under `timeout`.
STEPS=(
  "install|40|\$PY -m pip install -q --no-build-isolation --no-deps -e ."
  "gpu-info|10|gpu_info"
  "bench-headline|125|\$PY benchmarks/gpu_quick.py --out \"\$OUT_DIR\" --set headline --budget-s 100"
  "tests-gpu|95|run_gpu_tests"
)
RUN_LIMIT=300
if ((QUICK == 0)); then
  STEPS+=(
    "bench-more|80|\$PY benchmarks/gpu_quick.py --out \"\$OUT_DIR\" --set more --budget-s 60"
    "train-cuda|90|train_cuda"
  )
  RUN_LIMIT=480
fi
# Run only when asked for by name (ONLY=tune): a sweep does not fit the runs' limits.
EXTRA_STEPS=("tune|150|\$PY benchmarks/tune_gpu.py --out \"\$OUT_DIR/tune.jsonl\" --budget-s 60")

run_gpu_tests() { # the tests that run the kernels on the GPU; TESTS_K overrides the selection
  local args=(-q -rfEs -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml")
  # 8 workers when pytest-xdist is installed (Triton compiles dominate), 2 CPU threads each
  if "$PY" -c "import xdist" 2>/dev/null; then args+=(-n 8); export OMP_NUM_THREADS=2; fi
  args+=(-k "${TESTS_K:-cuda or gpu or triton or low_precision or half}")
  "$PY" -m pytest tests/test_attention.py tests/test_distill.py tests/test_distill_ensemble.py \
    tests/test_feature_distill.py tests/test_sampled_softmax.py "${args[@]}"
}

train_cuda() { # the main job on ml-100k on the GPU, 1 seed, 1 epoch: windows per second
  for backend in auto torch; do # auto: the Triton kernels (torch only where they cannot run)
    "$PY" -m spnn_fast train --device cuda --backend "$backend" --seeds 1 --epochs 1 \
      --out "$OUT_DIR/train_cuda_$backend" 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -n 15
  done
}

gpu_info() { # the card's name as nvidia-smi gives it, and the versions that ran
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

summary() { # steps.json + summary.md: the comparisons as a table, named after the card
  "$PY" - <<'EOF'
import json, os
out = os.environ["OUT_DIR"]
steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, seconds = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "seconds": int(seconds)})
card = None
for name in ("gpu.json", "quick.json"):
    path = os.path.join(out, name)
    if card is None and os.path.exists(path):
        with open(path) as f:
            card = json.load(f).get("card")
with open(os.path.join(out, "steps.json"), "w") as f:
    json.dump({"card": card, "steps": steps, "seconds": sum(s["seconds"] for s in steps)}, f,
              indent=2)
lines = [f"# GPU check on {card}", ""]
path = os.path.join(out, "quick.json")
if os.path.exists(path):
    with open(path) as f:
        quick = json.load(f)
    form = quick.get("bias_form") or {}
    lines += [f"Time bias in the attention kernels: {form.get('form')} form ({form.get('why')})", ""]
    lines += ["| op | mode | shape | ours (ms) | baseline | baseline (ms) | baseline / ours |",
              "|---|---|---|---|---|---|---|"]
    for c in quick["comparisons"]:
        shape = " ".join(f"{k}={v}" for k, v in c["shape"].items())
        lines.append(f"| {c['op']} | {c['mode']} | {shape} | {c['ours_ms']:.3f} | "
                     f"{c['baseline']} | {c['baseline_ms']:.3f} | "
                     f"{c['baseline_ms'] / c['ours_ms']:.2f}x |")
    for c in quick.get("skipped", []):
        lines.append(f"\nskipped: {c['op']} {c['mode']} {c['shape']} {c['baseline']}: "
                     f"{c['reason']}")
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}
export -f gpu_info run_gpu_tests train_cuda

names=",$(printf '%s\n' "${STEPS[@]}" "${EXTRA_STEPS[@]}" | cut -d'|' -f1 | paste -sd,),"
for want in ${ONLY//,/ }; do
  if [[ "$names" != *",$want,"* ]]; then echo "ONLY: unknown step '$want'; steps:${names//,/ }" >&2; exit 2; fi
done
selected=("${STEPS[@]}")
if [[ -n "${ONLY:-}" ]]; then
  selected=()
  for step in "${STEPS[@]}" "${EXTRA_STEPS[@]}"; do
    if [[ ",$ONLY," == *",${step%%|*},"* ]]; then selected+=("$step"); fi
  done
fi
total=0
for step in "${selected[@]}"; do
  rest="${step#*|}"
  total=$((total + ${rest%%|*} + GRACE))
done
if ((DRY_RUN)); then
  for step in "${selected[@]}"; do
    rest="${step#*|}"
    printf 'step %s limit %s s: %s\n' "${step%%|*}" "${rest%%|*}" "${rest#*|}"
  done
  echo "total ${total} s of step limits and grace; run limit ${RUN_LIMIT} s"
  exit 0
fi
if [[ -z "${ONLY:-}" ]] && ((total > RUN_LIMIT)); then
  echo "gpu_check.sh: the steps' limits add up to ${total} s > ${RUN_LIMIT} s" >&2
  exit 2
fi

mkdir -p "$OUT_DIR"
: >"$OUT_DIR/steps.tsv"
if [[ -z "${ONLY:-}" || ",$ONLY," == *",bench-headline,"* ]]; then
  rm -f "$OUT_DIR/quick.json" "$OUT_DIR/quick.jsonl" # this run's comparisons only
fi
failed=0
start_all=$(date +%s)
for step in "${selected[@]}"; do
  name="${step%%|*}"
  rest="${step#*|}"
  limit="${rest%%|*}"
  cmd="${rest#*|}"
  echo "=== [$name] $cmd (limit $limit s)"
  t0=$(date +%s)
  if timeout -k "$GRACE" "$limit" bash -euo pipefail -c "$cmd"; then status=ok; else status="failed (exit $?)"; failed=1; fi
  t1=$(date +%s)
  echo "=== [$name] $status in $((t1 - t0)) s (total $((t1 - start_all)) s)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((t1 - t0))" >>"$OUT_DIR/steps.tsv"
  if [[ -n "${ARCHIVE:-}" ]]; then tar czf "$ARCHIVE" -C "$OUT_DIR" . || true; fi
done

summary || failed=1
if [[ -n "${ARCHIVE:-}" ]]; then tar czf "$ARCHIVE" -C "$OUT_DIR" . || true; fi
exit "$failed"
