#!/usr/bin/env bash
# One GPU session's checks in one call (a few minutes): the fused path's tests compiled on the
# card, then every scenario; tables and a profile go to $OUT (default ./out) and print last.
#   bash benchmarks/gpu.sh            # from the repository root, with driftloss installed
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # torch and JAX share the card
PY="${PYTHON:-python3}"
export DRIFTLOSS_BACKEND=torch  # tests/test_fused_path.py runs on the torch backend
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

timeout 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_path.py 2>&1 | tail -15 | tee "$OUT/tests.txt"

timeout 250 "$PY" -m benchmarks.run --device cuda --scenarios b2-class --repeats 5 --no-append --impls \
    paper-literal torch "torch:stages=1" "torch:stages=2" "torch:prec=tf32x3/tf32/tf32x3" "torch:prec=tf32/tf32/tf32" \
    "torch:prec=ieee/ieee/ieee" "torch:warps=4" "torch:warps=16" "torch:bc=16" "torch:work=128" "torch:work=1024" \
    torch-blocked torch-core jax \
    > "$OUT/b2.md" 2> "$OUT/b2.log"

timeout 60 "$PY" -m benchmarks.profile_step --scenario b2-class --impl torch > "$OUT/profile.txt" 2>&1

timeout 150 "$PY" -m benchmarks.run --device cuda --scenarios cifar-like toy-large --repeats 5 --no-append \
    --impls paper-literal torch torch-core jax > "$OUT/others.md" 2> "$OUT/others.log"

tail -n 5 "$OUT/b2.log" "$OUT/others.log"
cat "$OUT/profile.txt" "$OUT/b2.md" "$OUT/others.md"
