#!/usr/bin/env bash
# Device checks on a lent CUDA GPU, in one call of a few minutes (run from the repo root):
#
#   bash .gpu/device-checks.sh            # DEVICE=cuda by default; DEVICE=cpu runs the same on a CPU (bf16)
#
# 1. the test suite's device-sensitive tests (`-m device`: fp16 vs fp32 on tiny models within the
#    bounds stated in tests/test_device_precision.py, channels-last on/off, low-VRAM offloading,
#    no NaN from the VAE where the rest is fp16) with --device cuda;
# 2. benchmarks/step.py in fp16: one SD1.5 UNet + ControlNet step at 512x512, ours vs diffusers;
# 3. benchmarks/generate.py in fp16: a whole 512x512 20-step image with one ControlNet, ours vs
#    diffusers' StableDiffusionControlNetPipeline, per stage, load time and peak memory.
# Full-size random weights are written first (benchmarks/sd15_files.py, ~3 GB, into $RUNS; kept
# on a warm machine). Logs land in $OUT. Budget (estimates for one H100/H200, never measured):
# files ~1 min with 16 cores, tests ~1 min, step ~1 min, image ~2 min (load both sides ~1 min).
#
# Written without a GPU (the task that wrote it had none lent): it has never run on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu-out}
RUNS=${RUNS:-runs}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-$([ "$DEVICE" = cpu ] && echo bf16 || echo fp16)}
SIZE=${SIZE:-512}
STEPS=${STEPS:-20}
mkdir -p "$OUT" "$RUNS"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
status=0

echo "== 1. device tests ($DEVICE) =="
timeout -k 10 300 python -m pytest -q -p no:cacheprovider -m device --device "$DEVICE" tests/ 2>&1 \
    | tee "$OUT/device-tests.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 2. one step, $DTYPE =="
timeout -k 10 180 python benchmarks/step.py --device "$DEVICE" --dtypes "$DTYPE" --size "$SIZE" --repeats 10 2>&1 \
    | tee "$OUT/step.log" | tail -8
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 3. a whole image, $DTYPE =="
timeout -k 10 150 python benchmarks/sd15_files.py "$RUNS/sd15" > /dev/null || status=1
timeout -k 10 300 python benchmarks/generate.py --dir "$RUNS/sd15" --device "$DEVICE" --dtype "$DTYPE" \
    --size "$SIZE" --steps "$STEPS" 2>&1 | tee "$OUT/generate.log" | tail -14
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
