#!/usr/bin/env bash
# One GPU session's checks in one call (a few minutes): the fused path's tests compiled on the
# card, then every scenario; tables and a profile go to $OUT (default ./out) and print last.
#   bash benchmarks/gpu.sh            # from the repository root, with driftloss installed
# On the lent GPU machine (its image lacks array-api-compat; carry the wheels in an ignored .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl array-api-compat==1.16.0 array-api-strict==2.6.1   # here
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#       && python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . && bash benchmarks/gpu.sh
# About 7 minutes on an H200 (the limits below keep it under 10).
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # torch and JAX share the card
PY="${PYTHON:-python3}"
export DRIFTLOSS_BACKEND=torch  # tests/test_fused_path.py runs on the torch backend
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

timeout 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_path.py 2>&1 | tail -15 | tee "$OUT/tests.txt"

# b2-class at full width: ~20 s of data generation, then ~10 s per torch row (Triton compiles) and up to a
# minute for JAX's compile; the first H200 session's full list of 15 rows did not fit in 4 minutes.
# torch (the default, blocked) shares one evaluation among the groups of a map; torch-augmented is the same
# with the augmented distance product (the default, at full width, takes the plain one); torch-fused is the
# opt-in Triton path; jax sums per-group calls, jax-groups is drifting_loss_groups.
timeout 250 "$PY" -m benchmarks.run --device cuda --scenarios b2-class --repeats 5 --no-append --impls \
    paper-literal torch torch-augmented torch-fused "torch-fused:bc=16" jax jax-groups \
    > "$OUT/b2.md" 2> "$OUT/b2.log"

timeout 60 "$PY" -m benchmarks.profile_step --scenario b2-class --impl torch > "$OUT/profile.txt" 2>&1

timeout 150 "$PY" -m benchmarks.run --device cuda --scenarios cifar-like toy-large --repeats 5 --no-append \
    --impls paper-literal torch torch-core jax > "$OUT/others.md" 2> "$OUT/others.log"

tail -n 5 "$OUT/b2.log" "$OUT/others.log"
cat "$OUT/profile.txt" "$OUT/b2.md" "$OUT/others.md"
