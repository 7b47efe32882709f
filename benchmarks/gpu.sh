#!/usr/bin/env bash
# One GPU session's measurements in one call of at most 5 minutes: every scenario at full width, the
# tables printed last; rows go to $OUT (default ./out). GPU_CHECKS=1 first runs the GPU-only tests
# (graph capture, TF32 products of torch and JAX, the fused kernels compiled) and profiles torch's
# b2-class step (about 2 minutes more).
#   bash benchmarks/gpu.sh            # from the repository root, with driftloss installed
# On the lent GPU machine (its image lacks array-api-compat; carry the wheels in an ignored .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl array-api-compat==1.16.0 array-api-strict==2.6.1 \
#       threadpoolctl==3.8.0   # here
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#       && python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . && bash benchmarks/gpu.sh
# Each benchmarks.run starts no row after its --time-budget and prints its table; the timeouts are
# hard stops behind those budgets (a row takes up to a minute: JAX compiles, Triton compiles, ~4 GB
# of b2-class inputs per implementation); their progress logs keep every finished row either way.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # torch and JAX share the card
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "${GPU_CHECKS:-0}" = 1 ]; then
    DRIFTLOSS_BACKEND=torch timeout 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
        tests/test_tf32_products.py tests/test_fused_path.py tests/test_torch_regression.py 2>&1 | tail -15 \
        | tee "$OUT/tests.txt"
    DRIFTLOSS_BACKEND=jax timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_jax_tf32_products.py \
        2>&1 | tail -8 | tee -a "$OUT/tests.txt"
    timeout 60 "$PY" -m benchmarks.profile_step --scenario b2-class --impl torch > "$OUT/profile.txt" 2>&1
fi
start=$SECONDS

# b2-class (~20 s of data generation on the host), rows in order of what they decide:
#   torch          the default: blocked fast drift, the groups of a map in one evaluation, float32 products
#   jax-groups     drifting_loss_groups on JAX (jax: the sum of one call per group)
#   jax-tf32x3     jax-groups with XLA's three-pass TF32 products (float32-faithful, opt-in)
#   torch-graphed  torch's step replayed from a CUDA graph: what launch overhead costs the default
#   torch-tf32x3   the default with float32-faithful TF32 products (adapters/torch_tf32.py, opt-in)
#   torch-whole-columns  the centred columns made once: less copying, 1.25 GiB more (RESULTS.md, 16:49)
#   torch-stack-all  the groups of a map in one evaluation whatever their size: fewer launches, 2.25 GiB
#                  instead of 1.01 GiB on the CPU-measured plan (RESULTS.md, 22:39)
#   torch-kept-coefficients  F's coefficients kept instead of F: one more product, less memory
#   torch-fused    the opt-in Triton kernels; torch-augmented / torch-tf32: the distance rule, lossy TF32
timeout 200 "$PY" -m benchmarks.run --device cuda --scenarios b2-class --repeats 5 --no-append --time-budget 140 \
    --impls paper-literal torch jax-groups torch-graphed torch-tf32x3 jax-tf32x3 torch-stack-all \
    torch-whole-columns torch-kept-coefficients jax torch-fused \
    torch-augmented torch-tf32 > "$OUT/b2.md" 2> "$OUT/b2.log"

left=$((285 - (SECONDS - start)))
timeout "$left" "$PY" -m benchmarks.run --device cuda --scenarios cifar-like toy-large --repeats 5 --no-append \
    --time-budget $((left - 45)) --impls paper-literal torch jax torch-graphed torch-core \
    > "$OUT/others.md" 2> "$OUT/others.log"

echo "benchmarks: $((SECONDS - start)) s"
tail -n 3 "$OUT/b2.log" "$OUT/others.log"
cat "$OUT"/profile.txt "$OUT/b2.md" "$OUT/others.md" 2>/dev/null
