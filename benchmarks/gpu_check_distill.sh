#!/usr/bin/env bash
# GPU step for the distillation losses: tests, then benchmarks, results as JSON in the folder $1.
#
#   bash benchmarks/gpu_check_distill.sh OUT_DIR
#
# Writes OUT_DIR/distill_tests.json     (counts and failures of tests/test_distill.py and
#                                         tests/test_feature_distill.py on the GPU)
#        OUT_DIR/distill_tests.xml      (the same, as JUnit XML)
#        OUT_DIR/bench_distill.json     (pytest-benchmark: time and extra_info.peak_bytes per impl)
#        OUT_DIR/bench_distill_log.txt  (the run's output: tables, skip reasons, OOM ones included)
# Environment: SPNN_BENCH_DTYPES (default bfloat16), PYTHON (default python).
# Exit status: non-zero when a test failed or the benchmark run errored; the benchmarks run anyway.
set -u
out="${1:?usage: gpu_check_distill.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
status=0

"$py" -m pytest tests/test_distill.py tests/test_feature_distill.py -q -rs -p no:cacheprovider \
    --junitxml="$out/distill_tests.xml" --durations=10 || status=1
"$py" - "$out/distill_tests.xml" "$out/distill_tests.json" <<'PYEOF'
import json, sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
summary = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
for suite in suites:
    for key in ("tests", "failures", "errors", "skipped"):
        summary[key] += int(suite.get(key, 0))
    summary["time_s"] += float(suite.get("time", 0))
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            summary["failed"].append(
                {"test": case.get("classname", "") + "::" + case.get("name", ""),
                 "message": (bad.get("message") or "")[:2000]}
            )
with open(sys.argv[2], "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "failed"}))
PYEOF

"$py" -m pytest benchmarks/bench_distill.py -q -rs -p no:cacheprovider \
    --benchmark-json="$out/bench_distill.json" --benchmark-columns=min,median,max,rounds \
    --benchmark-group-by=group 2>&1 | tee "$out/bench_distill_log.txt" | tail -n 80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
