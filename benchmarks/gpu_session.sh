#!/usr/bin/env bash
# One GPU call that checks and times what CPU-only sessions changed (issue 7), everything written under $OUT.
#
# Made for the `device` tool, whose machine lacks pydantic: first download here the cp312 wheels of pydantic,
# pydantic-core, annotated-types, typing-inspection and typing-extensions into .whl/ (the tool's README says how),
# then   run  command: "bash benchmarks/gpu_session.sh"   carry: [".whl"]   timeout_s: 600
# Elsewhere: OUT=/tmp/out bash benchmarks/gpu_session.sh (needs CUDA).  Each step has its own time limit so that the
# whole call ends inside 10 minutes (the limits add up to 580 s, in order of priority); a step that fails or times out
# leaves its log, and the next step still runs.
# Files under $OUT: log.txt and results.tar.gz (the device tool brings back at most 8 files: every step writes under
# $RES, packed at the end): gpu_tests.txt, h_*.json / .md (one harness row each), compile_check_*.json, memory_kernels_*.
set -u
OUT=${OUT:?set OUT to a folder for the results}
export OUT
mkdir -p "$OUT"
RES=/tmp/gpu_results
rm -rf "$RES" && mkdir -p "$RES"
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

# 1. the GPU-only tests, with session 15's new one (CUDA graphs over blocks compiled by inductor: its compile is most
#    of this step's time); 16 passed in session 14
step 170 gpu-tests sh -c "python3 -m pytest -q -p no:cacheprovider -rfE --durations=0 tests/test_fused_gate.py \
  tests/test_activation_checkpointing.py tests/test_fused_memory.py tests/test_static_decode.py \
  tests/test_attention.py -k 'gpu or cuda or graph_replay' > $RES/gpu_tests.txt 2>&1"
# 2. flat scaling compiled: MAC 65536 x 1, blocks compiled + CUDA graphs (4096 x 8: 307,307 tokens/s in session 15;
#    eager graphed 65536 x 1: 78,368). (not "CC": Triton's launcher build reads that name as the C compiler)
HARNESS="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 \
  --memory-chunk 64 --no-prefill"
step 180 mac-65536x1-compile-graphs $HARNESS --compile --compile-scope blocks --cuda-graphs --models mac \
  --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_compile_blocks_graphs.json"
# 3. compiled == eager on CUDA for the other variants (MAC: worst gradient 3.5e-4, session 15)
step 100 compile-check-cuda python3 benchmarks/compile_check.py --device cuda --dtype float32 --dim 128 --heads 2 \
  --window 64 --memory-chunk 16 --seq 256 --variants mag mal lmm --memory-backend triton --scope blocks \
  --out "$RES/compile_check_cuda_blocks.json"
# 4. the memory kernels with 4 warps (8: the default, 16: 2x slower, session 15; 4 did not finish in 45 s there)
step 40 memory-kernels-warps-4 env TITANS_TRITON_WARPS=4 python3 benchmarks/memory_kernels.py --backends triton \
  --parts --shapes 8x8x512x64x128x64x2 --out "$RES/memory_kernels_warps_4.json"
# 5. the capture of a curriculum's later stage (MAC's 2,048-token stage failed to capture in both calls of RESULTS 4u:
#    an earlier stage's graphs collected inside the capture; now gc_paused): no "capture failed" warning expected
step 90 curriculum-capture sh -c "python3 -m titans train --config niah --out /tmp/cc_run --set model.variant=mac \
  --set model.ffn_mult=4.0 --set model.mac_memory_input=residual --set 'data.tasks=[babilong_qa1]' \
  --set data.task_placement=random --set training.cuda_graphs=true --set logging.progress=false \
  --set 'training.curriculum=[{seq_len: 320, max_steps: 30}, {seq_len: 1024, max_steps: 20, batch_size: 4},
  {seq_len: 2048, max_steps: 20, batch_size: 2}]' > $RES/curriculum_capture.txt 2>&1; \
  echo capture-failed-warnings: \$(grep -c 'capture failed' $RES/curriculum_capture.txt)"
# (later: the autotuner's gain, `env TITANS_TRITON_AUTOTUNE=1 $HARNESS --cuda-graphs --models mac --shapes 4096x8`,
#  several minutes of compiles; why MAC's graph capture fails at 2 x 2048-token rows under MPS, benchmarks/RESULTS.md 4u)

tar -czf "$OUT/results.tar.gz" -C /tmp gpu_results
grep '^==' "$LOG"
