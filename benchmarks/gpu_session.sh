#!/usr/bin/env bash
# One GPU call that checks and times what CPU-only sessions changed (issue 7), everything written under $OUT.
#
# Made for the `device` tool, whose machine lacks pydantic: first download here the cp312 wheels of pydantic,
# pydantic-core, annotated-types, typing-inspection and typing-extensions into .whl/ (the tool's README says how),
# then   run  command: "bash benchmarks/gpu_session.sh"   carry: [".whl"]   timeout_s: 600
# Elsewhere: OUT=/tmp/out bash benchmarks/gpu_session.sh (needs CUDA).  Each step has its own time limit so that the
# whole call ends inside 10 minutes (the limits add up to 565 s); a step that fails or times out leaves its log, and
# the next step still runs.
# Files under $OUT: log.txt, h_*.json (one harness row each), memory_kernels_warps_*.json.
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

# 1. the reference rows of the configuration, CUDA graphs, one model and shape per process, training only.
#    (not "CC": Triton's launcher build reads that name from the environment as the C compiler)
HARNESS="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 \
  --memory-chunk 64 --no-prefill"
step 60 mac-4096x8 $HARNESS --cuda-graphs --models mac --shapes 4096x8 --out "$OUT/h_mac_4096x8.json"
# 2. regional compilation (each block compiled on its own), eager launches: did not finish in 150 s in session 14
#    (with the prefill's own compilation in that step); the warm-up time (compilation) lands in the JSON
step 280 mac-4096x8-compile-blocks $HARNESS --compile --compile-scope blocks --models mac --shapes 4096x8 \
  --warmup 2 --iters 3 --out "$OUT/h_mac_4096x8_compile_blocks.json"
# 3. the Transformer compiled too (the fair reference for a compiled MAC; eager with CUDA graphs: 647,246 tokens/s in
#    session 14)
step 90 transformer-4096x8-compile $HARNESS --compile --models transformer --shapes 4096x8 --warmup 2 --iters 3 \
  --out "$OUT/h_transformer_4096x8_compile.json"
# 4. the memory kernels alone at MAC's per-segment shape (8 x 8 heads x 512 tokens, head 64, hidden 128, chunk 64):
#    time per pass and stage, with 4 / 8 / 16 warps (the default takes 8 at this size)
for w in 4 8 16; do
  step 45 "memory-kernels-warps-$w" env TITANS_TRITON_WARPS=$w python3 benchmarks/memory_kernels.py --backends triton \
    --parts --shapes 8x8x512x64x128x64x2 --out "$OUT/memory_kernels_warps_$w.json"
done
# (next: the compile check on CUDA, `python3 benchmarks/compile_check.py --device cuda --dtype float32 --dim 128
#  --heads 2 --window 64 --memory-chunk 16 --seq 256 --variants mac mag --memory-backend triton --scope blocks`, and
#  the autotuner's gain, `env TITANS_TRITON_AUTOTUNE=1 $HARNESS --cuda-graphs --models mac --shapes 4096x8`, each
#  with a limit of several minutes: both timed out at 80-110 s in session 14; the GPU-only tests:
#  python3 -m pytest -q tests/test_fused_gate.py tests/test_activation_checkpointing.py tests/test_fused_memory.py
#  tests/test_static_decode.py tests/test_attention.py -k 'gpu or cuda or graph_replay' (16 passed, session 14))

grep '^==' "$LOG"
