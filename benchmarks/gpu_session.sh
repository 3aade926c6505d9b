#!/usr/bin/env bash
# One GPU call that checks and times what CPU-only sessions changed (issue 7), everything written under $OUT.
#
# Made for the `device` tool, whose machine lacks pydantic: first download here the cp312 wheels of pydantic,
# pydantic-core, annotated-types, typing-inspection and typing-extensions into .whl/ (the tool's README says how),
# then   run  command: "bash benchmarks/gpu_session.sh"   carry: [".whl"]   timeout_s: 600
# Elsewhere: OUT=/tmp/out bash benchmarks/gpu_session.sh (needs CUDA).  Each step has its own time limit so that the
# whole call ends inside 10 minutes (the limits add up to 460 s); a step that fails or times out leaves its log, and
# the next step still runs.
# Files under $OUT: log.txt, gpu_tests.txt, h_*.json (one harness row each), compile_check_cuda.json.
set -u
OUT=${OUT:?set OUT to a folder for the results}
export OUT
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
step() {  # step SECONDS NAME COMMAND...: run with a limit, note the exit status
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0))s" >> "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$LOG" 2>&1

# Triton's autotuner (opt-in, TITANS_TRITON_AUTOTUNE=1) compiles every configuration of every kernel per shape; on a
# fresh machine that alone took the 140 s of a tests step (session 14): fixed warps here
export TITANS_TRITON_AUTOTUNE=0

# 1. the GPU-only tests (all 16 passed in session 14; kept as the guard for whatever changed since)
step 120 gpu-tests sh -c "python3 -m pytest -q -p no:cacheprovider -rfE --durations=0 tests/test_fused_gate.py \
  tests/test_activation_checkpointing.py tests/test_fused_memory.py tests/test_static_decode.py \
  tests/test_attention.py -k 'gpu or cuda or graph_replay' > $OUT/gpu_tests.txt 2>&1"

# 2. the reference rows of the configuration, CUDA graphs, one model and shape per process.
#    (not "CC": Triton's launcher build reads that name from the environment as the C compiler)
HARNESS="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 \
  --memory-chunk 64"
step 60 mac-4096x8 $HARNESS --cuda-graphs --models mac --shapes 4096x8 --out "$OUT/h_mac_4096x8.json"
step 40 transformer-4096x8 $HARNESS --cuda-graphs --models transformer --shapes 4096x8 \
  --out "$OUT/h_transformer_4096x8.json"
# 3. regional compilation (each block compiled on its own), eager launches: did not finish in 150 s in session 14
step 240 mac-4096x8-compile-blocks $HARNESS --compile --compile-scope blocks --models mac --shapes 4096x8 \
  --warmup 2 --iters 3 --out "$OUT/h_mac_4096x8_compile_blocks.json"
# (next: the compile check on CUDA, `python3 benchmarks/compile_check.py --device cuda --dtype float32 --dim 128
#  --heads 2 --window 64 --memory-chunk 16 --seq 256 --variants mac mag --memory-backend triton --scope blocks`, and
#  the autotuner's gain, `env TITANS_TRITON_AUTOTUNE=1 $HARNESS --cuda-graphs --models mac --shapes 4096x8`, each
#  with a limit of several minutes: both timed out at 80-110 s in session 14)

grep '^==' "$LOG"
