#!/usr/bin/env bash
# One GPU call that checks and times what CPU-only sessions changed (issue 7), everything written under $OUT.
#
# Made for the `device` tool, whose machine lacks pydantic: first download here the cp312 wheels of pydantic,
# pydantic-core, annotated-types, typing-inspection and typing-extensions into .whl/ (the tool's README says how),
# then   run  command: "bash benchmarks/gpu_session.sh"   carry: [".whl"]   timeout_s: 600
# Elsewhere: OUT=/tmp/out bash benchmarks/gpu_session.sh (needs CUDA).  Each step has its own time limit so that the
# whole call ends inside 10 minutes (the limits add up to 590 s, in order of priority); a step that fails or times out
# leaves its log, and the next step still runs.
# Files under $OUT: log.txt and results.tar.gz (the device tool brings back at most 8 files: every step writes under
# $RES, packed at the end): kernel_tests.txt, memory_kernels.json / .md, gpu_tests_a.txt, gpu_tests_b.txt, h_*.json / .md.
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

# 1. first, the three-stage backward as restructured in session 16 against the PyTorch core on this GPU (it was
#    checked only under the CPU interpreter: session 16's call timed it but its test step ran out of time first)
step 90 kernels-vs-reference sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
  -k on_gpu > $RES/kernel_tests.txt 2>&1"
# 2. the memory kernels alone at MAC's per-segment shape and at 4096 tokens, checked against the PyTorch core too
#    (session 16: forward 0.23 + 0.08 ms, backward stages 0.75 / 0.51 / 0.33 ms at 8x8x512)
step 90 memory-kernels python3 benchmarks/memory_kernels.py --backends triton --parts \
  --shapes 8x8x512x64x128x64x2 8x8x4096x64x128x64x2 --out "$RES/memory_kernels.json"
# 3. the other GPU-only tests (session 16: 150 s was not enough for all of them in one step)
step 120 gpu-tests-a sh -c "python3 -m pytest -q -p no:cacheprovider -rfE --durations=0 tests/test_fused_gate.py \
  tests/test_activation_checkpointing.py tests/test_attention.py -k 'gpu or cuda or graph_replay' \
  > $RES/gpu_tests_a.txt 2>&1"
step 150 gpu-tests-b sh -c "python3 -m pytest -q -p no:cacheprovider -rfE --durations=0 tests/test_static_decode.py \
  -k 'gpu or cuda or graph_replay' > $RES/gpu_tests_b.txt 2>&1"
# 4. flat scaling compiled: MAC 65536 x 1, blocks compiled + CUDA graphs (4096 x 8: 320,369 tokens/s in session 16;
#    eager graphed 65536 x 1: 78,368, session 14). (not "CC": Triton's launcher build reads that name as the C
#    compiler)
HARNESS="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 \
  --memory-chunk 64 --no-prefill"
step 140 mac-65536x1-compile-graphs $HARNESS --compile --compile-scope blocks --cuda-graphs --models mac \
  --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_compile_blocks_graphs.json"
# (later: compile_check.py --device cuda for MAG / MAL / LMM; MAC's CUDA-graph capture in a curriculum after the gc
#  fix; the autotuner's gain, `env TITANS_TRITON_AUTOTUNE=1 $HARNESS --cuda-graphs --models mac --shapes 4096x8`)

tar -czf "$OUT/results.tar.gz" -C /tmp gpu_results
grep '^==' "$LOG"
