#!/usr/bin/env bash
# The ImageNet trainers' training step on one GPU in one call of at most 5 minutes: ablation, latent-b2,
# latent-l2, pixel-b16, pixel-l16 at their per-GPU share of 8 GPUs (n_classes / 8 classes; halved until it
# fits), one warm-up + 3 timed steps each, every preset in its own process under a timeout, the rows appended
# to benchmarks/RESULTS_LOG.md ("ImageNet training step") and the table printed last; logs in $OUT (default ./out).
#   bash benchmarks/imagenet_gpu.sh          # from the repository root, with driftloss installed
#   bash benchmarks/imagenet_gpu.sh --dry-run  # any machine, no GPU: shapes, FLOPs, the estimated GPU-hours
# On the lent GPU machine (its image has torch, timm, tqdm, triton; it lacks array-api-compat: carry the wheels
# in an ignored .whl/, as for benchmarks/gpu.sh):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl array-api-compat==1.16.0 array-api-strict==2.6.1 \
#       threadpoolctl==3.8.0   # here, once
#   device run, carry [".whl"], timeout_s 420, command:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#       && python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
#       && bash benchmarks/imagenet_gpu.sh
# The device's working tree does not come back: $OUT/imagenet_step.md is the section --write appended to
# RESULTS.md there; append it to benchmarks/RESULTS_LOG.md here (cat it >> the file). The log: imagenet_step.log.
# Budget: benchmarks.imagenet_step gives each preset the time left divided by the presets left (of 270 s) and
# stops timing steps that would overrun it (the warm-up step is then reported, marked); the outer timeout is
# the hard stop behind it. Random encoder weights: the same FLOPs as the MAE / ConvNeXt-V2 ones, nothing loaded.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--dry-run" ]; then
    exec "$PY" -m benchmarks.imagenet_step --dry-run
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/imagenet_gpu.txt"
"$PY" -c "import torch, timm, tqdm, driftloss, reference_trainers.imagenet.train" \
    || { echo "imagenet_gpu.sh: a module is missing (see the header's recipe)"; exit 1; }
start=$SECONDS
timeout 290 "$PY" -m benchmarks.imagenet_step --device cuda \
    --presets ablation latent-b2 latent-l2 pixel-b16 pixel-l16 --steps 3 --time-budget 270 --write \
    > "$OUT/imagenet_step.md" 2> "$OUT/imagenet_step.log"
echo "imagenet_step: exit $?, $((SECONDS - start)) s"
grep -E "does not fit|Error|error" "$OUT/imagenet_step.log" | tail -n 20
cat "$OUT/imagenet_step.md"
