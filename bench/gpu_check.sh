#!/usr/bin/env bash
# The CUDA check: render on a GPU and measure it, on a machine with no network.
#
#   bash bench/gpu_check.sh [STAGE ...]      # default: app tests eager compiled
#
# Stages, in the order given, each printing as it goes:
#   app       the app at the speed it serves (bench.appcheck): its engine loaded as
#             `python app.py` loads it (compiled serving graphs on CUDA), warmed up
#             before each row, through the fast channel's Python client: one
#             artist in latency mode (4 steps, 1 step) and stream mode (4 steps,
#             1 step), 8 artists batched; renders/s, latency, frame time p50 /
#             p95 / max, and the issue's targets for sd15-random at 512²
#   tests     the CUDA tests (tests/test_cuda.py: float16 on CUDA against
#             float32 on the CPU, sd15-random at 512² in both modes with the
#             bank on and off, the fast path against eager, no NaN/Inf)
#   eager     the bank benchmark, eager: sd15-random 512² float16, 4 and 1
#             steps, stream batch and latency, none / queue(1) / DyMe(1), the
#             streamdiffusion peer in the same run, with a per-stage profile
#   live      the live path with the real engine on the GPU (bench.live, the
#             Python client of the fast channel instead of a browser; not run by
#             default: the app stage measures the same, compiled)
#   many      8 simulated artists on the GPU, batched and one at a time (bench.loadtest,
#             each sending at most 60 snapshots a second, as a page on a 60 Hz display;
#             not run by default: its server compiles again in a process of its own)
#   compiled  the bank benchmark through torch.compile (CUDA graphs), 4 steps,
#             stream batch, none and DyMe(1), with the peer compiled alike
#
# Results: OUT/log.txt (everything printed) and OUT/results.tgz (each stage's
# JSON and markdown, re-packed after every stage), where OUT is $OUT (the
# device tool's folder) or gpu_results/.  Wheels the machine lacks (diffusers,
# streamdiffusion, av, gradio and its needs) are installed from .whl/ into
# /tmp/site when that folder exists.  No stage starts after GPU_CHECK_SECONDS
# (default 450) and each is cut to the time left, so the whole run ends
# inside the device call's limit.  The app stage warms up only the settings
# of its rows (--warm rows: compiling every step count the page offers in
# stream mode would take minutes more) and writes its results after every
# row, so a cut run keeps the rows it finished; GPU_CHECK_APP_SECONDS (6)
# is each of its rows' measured time.
#
# A dry run on a CPU, end to end at small sizes (the CUDA tests skip):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=tiny GPU_CHECK_SIZE=64 bash bench/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=tiny GPU_CHECK_SIZE=64 bash bench/gpu_check.sh app
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_results}
BUDGET=${GPU_CHECK_SECONDS:-450}
APP_SECONDS=${GPU_CHECK_APP_SECONDS:-6}
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-sd15-random}
SIZE=${GPU_CHECK_SIZE:-512}
DTYPE=$([ "$DEVICE" = cuda ] && echo float16 || echo float32)
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
START=$(date +%s)
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(app tests eager compiled)
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(elapsed) s] $*"; }
pack() { tar czf "$OUT/results.tgz" -C "$WORK" . ; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { say "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
DEVICE=$DEVICE "$PYTHON" - <<'EOF' || { say "the environment is not usable"; exit 1; }
import importlib.metadata as metadata, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print(" | ".join(f"{name} {metadata.version(name)}" for name in
                 ("diffusers", "transformers", "huggingface_hub", "streamdiffusion", "gradio", "av")))
assert torch.cuda.is_available() or os.environ["DEVICE"] != "cuda", "no CUDA device"
EOF

run_stage() {  # run_stage NAME MIN_SECONDS COMMAND...: run COMMAND if MIN_SECONDS are left, cut at the budget
    local name=$1 need=$2; shift 2
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt "$need" ]; then
        say "skipping $name: ${left} s left, it needs about ${need} s"
        return
    fi
    say "stage $name (up to ${left} s): $*"
    timeout --kill-after=10 "$left" "$@"
    say "stage $name ended with exit status $?"
    pack
}

BENCH=(-m bench.engine --device "$DEVICE" --dtype "$DTYPE" --model "$MODEL" --size "$SIZE" --peer --rounds 6 --block 8)
for stage in "${STAGES[@]}"; do
    case $stage in
        app) run_stage app 120 "$PYTHON" -m bench.appcheck --device "$DEVICE" --model "$MODEL" --size "$SIZE" \
                 --warm rows --seconds "$APP_SECONDS" --out "$WORK/app" ;;
        tests) run_stage tests 60 "$PYTHON" -m pytest -q -s -m cuda tests/test_cuda.py ;;
        eager) run_stage eager 90 "$PYTHON" "${BENCH[@]}" --steps 4 1 --modes stream latency \
                   --rows none queue1 dyme1 --profile --output "$WORK/eager" ;;
        live) run_stage live 45 "$PYTHON" -m bench.live --cases "$MODEL:$SIZE" --modes latency stream \
                  --channels python --seconds 6 --torch-threads 0 --out "$WORK/live" ;;
        many) run_stage many 75 "$PYTHON" -m bench.loadtest --engine "$MODEL:$SIZE" --users 8 --single \
                  --seconds 8 --page-rate 60 --out "$WORK/many" ;;
        compiled) run_stage compiled 150 "$PYTHON" "${BENCH[@]}" --compile --steps 4 --modes stream \
                      --rows none dyme1 --output "$WORK/compiled" ;;
        *) say "unknown stage $stage (app tests eager live many compiled)"; exit 2 ;;
    esac
done
say "done"
