#!/usr/bin/env bash
# One GPU call that checks and times what CPU-only sessions changed (issue 7), everything written under $OUT.
#
# Made for the `device` tool, whose machine lacks pydantic: first download here the cp312 wheels of pydantic,
# pydantic-core, annotated-types, typing-inspection and typing-extensions into .whl/ (the tool's README says how),
# then   run  command: "bash benchmarks/gpu_session.sh"   carry: [".whl"]   timeout_s: 600
# Elsewhere: OUT=/tmp/out bash benchmarks/gpu_session.sh (needs CUDA).  Each step has its own time limit so that the
# whole call ends inside 10 minutes (the limits add up to 550 s); a step that fails or times out leaves its log, and
# the next step still runs.
# Files under $OUT (at most 8 come back from the device tool): log.txt, gpu_tests.txt, harness_graphs.json,
# harness_nogate.json, harness_compile.json, compile_check_cuda.json, harness_profile.json.
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

# 1. the GPU-only tests: fused gate, fused memory kernels, CUDA-graph capture of the recomputed step, graphed decode,
#    FlexAttention
step 140 gpu-tests sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_gate.py \
  tests/test_activation_checkpointing.py tests/test_fused_memory.py tests/test_static_decode.py \
  tests/test_attention.py -k 'gpu or cuda or graph_replay' > $OUT/gpu_tests.txt 2>&1"

# 2. the configuration, CUDA graphs: MAC and the Transformer at 4096 x 8 and 65536 x 1
H="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 --memory-chunk 64"
step 130 harness-graphs $H --models mac transformer --shapes 4096x8 65536x1 --cuda-graphs --out /tmp/h/graphs.json
# 3. the fused memory gate against the PyTorch gate (same run otherwise)
step 50 harness-nogate env TITANS_FUSED_GATE=0 $H --models mac --shapes 4096x8 --cuda-graphs --out /tmp/h/nogate.json
# 4. is compiled training the same computation on the GPU (float32, the Triton memory core: head dim 64 and chunk
#    16, shapes the kernels take; both sides run the same kernels, so only the compiled glue differs)
CC="python3 benchmarks/compile_check.py --device cuda --dtype float32 --dim 128 --heads 2 --window 64 \
  --memory-chunk 16 --seq 256"
step 90 compile-check $CC --variants mac mag --memory-backend triton --out "$OUT/compile_check_cuda.json"
# 5. compiled training speed (no graphs: the capture of a compiled model failed in session 5)
step 90 harness-compile $H --models mac --shapes 4096x8 --compile --out /tmp/h/compile.json
# 6. where the time goes now (eager, so the profiler sees each kernel)
step 50 harness-profile $H --models mac --shapes 4096x8 --warmup 1 --iters 2 --profile 40 --out /tmp/h/profile.json

for f in graphs nogate compile profile; do
  [ -f /tmp/h/$f.json ] && cp /tmp/h/$f.json "$OUT/harness_$f.json"
done
tail -n 60 "$LOG"
