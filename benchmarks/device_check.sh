#!/usr/bin/env bash
# Issue 21's GPU half in one call of the device tool (a lent H100/H200, ~9 minutes):
#
#     run(command="bash benchmarks/device_check.sh", timeout_s=600)
#
# 1. tests/test_gpu.py: the fused path in fp32/bf16 and the compiled step (inductor's
#    Triton kernels under bf16 autocast) against eager. Left out there: the bitsandbytes
#    test (no bitsandbytes on that image) and the NCCL FSDP run (its tiny model takes
#    SmolLM2's tokenizer, whose package cannot travel).
# 2. benchmarks/compile.py on SmolLM2's shape with random weights (the model's 94 MB do not
#    fit the 64 MiB that travels), bf16 autocast, batch 8x512: eager and compiled, the four
#    methods and PEFT DoRA+PiSSA compiled, with each step's peak GPU memory.
# 3. The 7B-shaped single layers at 2048 tokens with dx formed (as in a model), compiled LoRA/DuDe/PEFT.
#
# A dry run of the plumbing on a CPU, small (the gpu tests then skip; compiling takes longer there):
#     DEVICE=cpu BATCH=1 SEQ=32 TOKENS=64 ROUNDS=1 THREADS=2 LIMIT_X=4 OUT=/tmp/check bash benchmarks/device_check.sh
#
# Each part has a time limit of its own, so one that hangs leaves the others their time.
# Logs and result JSON go to $OUT (the device tool brings them back), else benchmarks/results.
# A failing part makes the script exit non-zero after the others ran.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}" BATCH="${BATCH:-8}" SEQ="${SEQ:-512}" TOKENS="${TOKENS:-2048}" ROUNDS="${ROUNDS:-10}"
THREADS="${THREADS:-8}" LIMIT_X="${LIMIT_X:-1}"
status=0
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$((limit * LIMIT_X))" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1; fi
part gpu-tests 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
    -k "not bitsandbytes and not nccl"
part compile-smollm2 250 "$PY" -m benchmarks.compile --section smollm2 --random-weights --device "$DEVICE" \
    --precision bf16 --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" --rounds "$ROUNDS" --out "$OUT" \
    --only dude-lora dude-dora dude-pissa dude-dude dude-lora:compiled dude-dora:compiled \
    dude-pissa:compiled dude-dude:compiled peft-dora+pissa:compiled
part compile-layers 160 "$PY" -m benchmarks.compile --section layers --input-grad --tokens "$TOKENS" --device "$DEVICE" \
    --precision bf16 --threads "$THREADS" --rounds "$ROUNDS" --out "$OUT" \
    --only dude-lora:compiled dude-dude:compiled peft-dora+pissa:compiled
exit $status
