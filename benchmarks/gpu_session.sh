#!/usr/bin/env bash
# Every GPU measurement cdi still lacks, in one call on a lent GPU machine (about 8-11 minutes on an H200;
# the batching step, which also pays torch.compile's warm-up, takes up to 7 minutes of it).
#
# The device's Python has torch, lightning, transformers, scikit-learn, scipy, pandas but not diffusers:
# carry its wheel (see benchmarks/README.md, "On a GPU machine"). Results go to $OUT (default
# /tmp/cdi-gpu-out): at most 8 files. Each step runs on even if an earlier one failed.
#
#   bash benchmarks/gpu_session.sh            # everything
#   CDI_GPU_STEPS="cifar sd15" bash benchmarks/gpu_session.sh
#   CDI_GPU_DRY_RUN=1 bash benchmarks/gpu_session.sh   # on a CPU: the extraction steps, tiny, to check plumbing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cdi-gpu-out}
mkdir -p "$OUT"
STEPS=${CDI_GPU_STEPS:-"cifar cifar32 batching sd15 dit"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cdi-site .whl/*.whl \
        && export PYTHONPATH=/tmp/cdi-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/session.log

if [ -n "${CDI_GPU_DRY_RUN:-}" ]; then
    DEVICE=cpu; N=8; DEMO=16; BATCH=8; REPEATS=1; THREADS=(--threads 1); STEPS=${CDI_GPU_STEPS:-"cifar"}
    COMPILE=()  # inductor's warm-up takes minutes on a CPU
else
    DEVICE=cuda; N=256; DEMO=200; BATCH=64; REPEATS=3; THREADS=(); COMPILE=(--compile)
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, never stop the session
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - started)) s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'lightning', lightning.__version__, 'diffusers', diffusers.__version__, 'gpu', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

for s in $STEPS; do
    case $s in
    cifar)  # fused vs naive vs floor, bf16 (the engine's CUDA default), demo and the 35.7 M CIFAR UNet
        step cifar-bf16 300 "$PY" benchmarks/extraction.py --device "$DEVICE" --no-mlflow --models demo,cifar \
            --n-images "$N" --demo-images "$DEMO" --batch-size "$BATCH" --precision bf16 --repeats "$REPEATS" \
            "${THREADS[@]}" --json "$OUT/extraction-bf16.json" ;;
    cifar32)
        step cifar-fp32 240 "$PY" benchmarks/extraction.py --device "$DEVICE" --no-mlflow --models cifar \
            --n-images "$N" --batch-size "$BATCH" --precision 32 --repeats "$REPEATS" "${THREADS[@]}" \
            --json "$OUT/extraction-fp32.json" ;;
    batching)  # timestep batching off/on, --compile on (warm-up timed apart), reference model in one shared pass
        # and as two separate passes: bf16 and float32 (one repeat: the separate passes cost a third more time)
        step batching 420 "$PY" benchmarks/batching.py --device "$DEVICE" --no-mlflow --models demo,cifar \
            --n-images "$N" --demo-images "$DEMO" --batch-size "$BATCH" --repeats 1 --no-naive "${COMPILE[@]}" \
            "${THREADS[@]}" --json "$OUT/batching.json" ;;
    sd15|dit)  # memory and speed per family at batch 1, 8, 32 on real-size latent models (random weights)
        arch=$([ "$s" = sd15 ] && echo sd15 || echo dit-xl-2-256)
        rm -rf "/tmp/cdi-$s"
        step "build-$s" 180 "$PY" benchmarks/random_pipelines.py "$arch" "/tmp/cdi-$s"
        step "gpu-check-$s" 300 "$PY" benchmarks/gpu_check.py --model "/tmp/cdi-$s" --no-audit --n 32 \
            --memory-batch-sizes 1,8,32 --json "$OUT/gpu-check-$s.json"
        rm -rf "/tmp/cdi-$s" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
    esac
done
ls -la "$OUT" | tee -a "$LOG"
