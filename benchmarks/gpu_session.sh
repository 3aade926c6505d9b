#!/usr/bin/env bash
# One GPU call that checks and times what CPU-only sessions changed (issue 7), everything written under $OUT.
#
# Made for the `device` tool, whose machine lacks pydantic: first download here the cp312 wheels of pydantic,
# pydantic-core, annotated-types, typing-inspection and typing-extensions into .whl/ (the tool's README says how),
# then   run  command: "bash benchmarks/gpu_session.sh"   carry: [".whl"]   timeout_s: 600
# (or "PART=2 BWD=overlap bash benchmarks/gpu_session.sh": MAC 65536 x 1 compiled + graphed, whole blocks; "PART=3
# bash benchmarks/gpu_session.sh", the next session's first call: the race fix of the one-launch backward, MAC's
# per-segment compile at 4096 x 8 and 65536 x 1, its GPU test, a profile of the compiled step)
# Elsewhere: OUT=/tmp/out bash benchmarks/gpu_session.sh (needs CUDA).  Each step has its own time limit so that the
# whole call ends inside 10 minutes (the limits add up to 590 s, in order of priority); a step that fails or times out
# leaves its log, and the next step still runs.
# Files under $OUT: log.txt and results.tar.gz (the device tool brings back at most 8 files: every step writes under
# $RES, packed at the end): memory_kernels_*.json / .md, h_*.json / .md, kernel_test_overlap.txt.
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
  tar -czf "$OUT/results.tar.gz" -C /tmp gpu_results  # after every step: a call cut short keeps what it measured
}
test_wavefront() {  # test_wavefront SECONDS [FILTER FILE]: tests/test_wavefront.py on the GPU (its CUDA tests, or
  # those -k FILTER picks), output in $RES/FILE (default gpu_test_wavefront.txt)
  local filter=${2:-} file=${3:-gpu_test_wavefront.txt}
  step "$1" gpu-test-wavefront sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_wavefront.py \
    ${filter:+-k '$filter'} > $RES/$file 2>&1"
}
finish() {  # every step's results in one archive (the device tool brings back few files), the steps' exit lines;
  # first the flat-scaling table of the call's harness rows (benchmarks/flat_scaling.py: ratios to 4096 x 8, PNG)
  if ls "$RES"/h_*.json > /dev/null 2>&1; then
    timeout 60 python3 benchmarks/flat_scaling.py "$RES"/h_*.json --out "$RES/flat_scaling" >> "$LOG" 2>&1
  fi
  tar -czf "$OUT/results.tar.gz" -C /tmp gpu_results
  grep '^==' "$LOG"
  exit 0
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$LOG" 2>&1

# Triton's autotuner (opt-in, TITANS_TRITON_AUTOTUNE=1) compiles every configuration of every kernel per shape; on a
# fresh machine that alone took the 140 s of a tests step (session 14): fixed warps here
export TITANS_TRITON_AUTOTUNE=0

PART=${PART:-1}  # session 17: PART=1 the overlapped backward, PART=2 flat scaling, PART=3 segment compile;
# session 18: PART=4 the fused convolution; session 19: PART=5 flat scaling of MAC (again, with the fused convolution;
# and segment-major with a stream per block), PART=6 of MAG; session 20: PART=7 the one-split segments, the wavefront
# with the three-launch backward, warps at batch 1
BWD=${BWD:-split}  # PART=2: the depth-2 backward to time with (TITANS_TRITON_BWD)
# MAC at the issue's shape, blocks compiled + CUDA graphs (PART=3 and 4 add the shape and the output)
# (HP: the same without CUDA graphs, for the profiles: the profiler then sees each kernel)
HP="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 --memory-chunk 64 \
  --no-prefill --compile --compile-scope blocks --models mac"
H3="$HP --cuda-graphs"
# MAC 65536 x 1 with the wavefront in 2048-token steps (sessions 21-24's flat-scaling rows)
WF="$H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048"
# the same in 4096-token steps (session 40: 284.5K vs 276.4K with 32 hardware queues on an H100)
WF4="$H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 4096"
# the same in 6144-token steps: the fastest step on an H100 (session 48: 4608-6144 all ~315K, 4096 306K, 6656 307K,
# 7168 300K, 8192 298K), the flat-scaling row since
WF6="${WF4/--wavefront-step 4096/--wavefront-step 6144}"
WF8="${WF4/--wavefront-step 4096/--wavefront-step 8192}"  # (session 41: 8192-token steps)
kernel_tests() {  # kernel_tests SECONDS NAME FILTER FILE [PYTEST OPTIONS]: tests/test_fused_memory.py -k FILTER,
  # output in $RES/FILE; the options default to -q
  local limit=$1 name=$2 filter=$3 file=$4; shift 4
  step "$limit" "$name" sh -c "python3 -m pytest ${*:--q} -p no:cacheprovider -rfE tests/test_fused_memory.py \
    -k '$filter' > $RES/$file 2>&1"
}
# sessions 26-27's rows with the defaults (no switch but the backward mode at batch 1), each under its limit SECONDS
mac_65536x1_defaults() {  # the flat-scaling row: MAC 65536 x 1 through the wavefront (SECONDS [harness options]);
  # until session 32 with TITANS_TRITON_BWD=split set here, since then the default there (auto)
  local limit=$1; shift
  step "$limit" mac-65536x1-wf2048-defaults $WF "$@" --out "$RES/h_wf2048_defaults.json"
}
smi_start() {  # the GPU's SM clock, power, temperature and clock-event reasons every 200 ms into $RES/smi.csv
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 200 > "$RES/smi.csv" 2>&1 &
  SMI=$!
}
mac_4096x8_defaults() {  # its denominator: MAC 4096 x 8 in one pass
  step "$1" mac-4096x8-defaults $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_defaults.json"
}
mac_65536x1_timeline() {  # one 65536 x 1 step under the profiler, each busy stream's kernels by name, and the busiest
  # streams' kernels in order (since session 33: h_wf2048_defaults_timeline.mac_65536x1.json.gz) cut into segment
  # steps by chain_anatomy.py (the busiest backward chain: anatomy.json / .md)
  step "$1" mac-65536x1-wf2048-defaults-timeline $H3 --wavefront --shapes 65536x1 \
    --warmup 1 --iters 1 --wavefront-step 2048 --profile 30 --out "$RES/h_wf2048_defaults_timeline.json" \
    --profile-trace "$RES/h_wf2048_defaults_timeline"
  step 30 chain-anatomy python3 benchmarks/chain_anatomy.py "$RES/h_wf2048_defaults_timeline.mac_65536x1.json.gz" \
    --out "$RES/anatomy.json"
}
combo_compile_check() {  # combo kernels' float64 compile check of MAC on the GPU (session 26, before they became default)
  step "$1" compile-check-combo env TITANS_INDUCTOR_OPTIONS='{"combo_kernels": true}' python3 \
    benchmarks/compile_check.py --device cuda --scope blocks --variants mac --out "$RES/compile_check_cuda_combo.json"
}
mac_65536x1_four_parts() {  # MAC 65536 x 1 with the walks over 4 parts (MIN_WALK_UNITS lowered for this process)
  step "$1" mac-65536x1-wf2048-four-parts env TITANS_TRITON_WALK_PARTS=4 TITANS_TRITON_BWD=split python3 -c \
    "import runpy, sys; import titans.core.memory.triton_kernels as tk; tk.MIN_WALK_UNITS = 32; \
    sys.argv[0] = 'benchmarks/harness.py'; runpy.run_path('benchmarks/harness.py', run_name='__main__')" \
    ${WF#python3 benchmarks/harness.py} --out "$RES/h_wf2048_four_parts.json"
}
weight_grad_tests() {  # tests/test_weight_grads.py's GPU case (streams, bf16)
  step "$1" gpu-test-weight-grads sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_weight_grads.py \
    -k gpu > $RES/gpu_test_weight_grads.txt 2>&1"
}
if [ "$PART" = 5 ]; then
  # session 19: MAC 65536 x 1 with the fused convolution (session 18 with conv1d: 115,102 tokens/s = 0.327x its 4096 x
  # 8); PART=6: the same two shapes for MAG, whose memory reads the whole sequence in one chunked pass (no segment
  # loop) but walks it with 8 programs at batch 1 too: is its scaling any flatter?
  # (session 19's call gave this step 100 s on a fresh machine, and it did not finish: 150 s)
  step 150 mac-65536x1-shifted-conv $H3 --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_shifted_conv.json"
  # the same row segment-major with one CUDA stream per block (titans.training.wavefront, session 19: exact on the CPU,
  # never run on a GPU): the three memory layers' segment chains overlap; first its GPU test (streams == one stream)
  test_wavefront 60
  step 150 mac-65536x1-wavefront $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 \
    --out "$RES/h_mac_65536x1_wavefront.json"
  # where batch 1's time goes (compiled, no CUDA graphs, inductor's cache warm from the step above): PART=3's profile
  # was of 4096 x 8; at 65536 x 1 the memory kernels are ~0.32 s of the ~0.57 s step (section 6, session 17)
  step 100 mac-65536x1-profile $HP --shapes 65536x1 --warmup 1 --iters 1 --profile 40 \
    --out "$RES/h_mac_65536x1_profile.json"
  finish
fi
if [ "$PART" = 7 ]; then
  # session 20: PART=5 gave MAC 65536 x 1 120,808 tokens/s one-pass and 121,594 with the wavefront (no gain), and its
  # profile had ~40 ms of full-length fills and adds from the backward of the segment slices (now one split)
  step 150 mac-65536x1-one-split $H3 --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_one_split.json"
  # the one-launch backward keeps 136 programs (spinning ones too) on 132 SMs, so no other stream's kernel can run
  # beside it: the wavefront with the three-launch backward, whose walk is 8 programs; then its timeline (the
  # profiler's kernels with CUDA graphs: how many ran side by side)
  step 100 mac-65536x1-wavefront-bwd-split env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 2 \
    --iters 3 --out "$RES/h_mac_65536x1_wavefront_bwd_split.json"
  step 80 mac-65536x1-wavefront-timeline env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 1 \
    --iters 1 --profile 30 --out "$RES/h_mac_65536x1_wavefront_timeline.json"
  # the memory kernels at batch 1 with 4 and 16 warps a program (default 8 at D=64, E=128): fewer spills a thread?
  for w in 4 16; do
    step 45 memory-kernels-warps-$w env TITANS_TRITON_WARPS=$w python3 benchmarks/memory_kernels.py --backends triton \
      --parts --shapes 1x8x512x64x128x64x2 --out "$RES/memory_kernels_b1_warps$w.json"
  done
  finish
fi
if [ "$PART" = 8 ]; then
  # session 20: PART=5 and 7's "--wavefront --cuda-graphs" rows captured the one-pass forward (the harness handed
  # graphed_loss the model, not the wavefront step; fixed): the wavefront under CUDA graphs for the first time, its
  # GPU tests first (now with graphed wavefront == eager one-pass), then both backwards, the timeline (PART=7's
  # one-pass timeline: 82,310 kernels, concurrency 1.00), and 4096 x 8 with the one-split segments (the flat ratio's
  # other side, session 18: 364,432 tokens/s)
  test_wavefront 70
  step 190 mac-65536x1-wavefront-graphed $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 \
    --out "$RES/h_mac_65536x1_wavefront_graphed.json"
  step 100 mac-65536x1-wavefront-graphed-bwd-split env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 \
    --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_wavefront_graphed_bwd_split.json"
  step 80 mac-65536x1-wavefront-graphed-timeline env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 \
    --warmup 1 --iters 1 --profile 20 --out "$RES/h_mac_65536x1_wavefront_graphed_timeline.json"
  step 110 mac-4096x8-one-split $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_one_split.json"
  finish
fi
if [ "$PART" = 9 ]; then
  # session 20: PART=8's graphed-wavefront test failed its capture (the eager reference's graph, still alive, tied
  # the gradient accumulators to the default stream); the test lets it go first: the wavefront tests again
  test_wavefront 90
  finish
fi
if [ "$PART" = 10 ]; then
  # next after session 20 (not run yet): the wavefront (209.0K tokens/s at 65536 x 1 with 512-token steps) spent
  # twice the one-pass kernel time, much of it in the attention-only blocks' 128 small steps each: 2 and 4 segments
  # a step (fewer, longer kernels; a coarser overlap)
  for st in 1024 2048; do
    step 150 mac-65536x1-wavefront-step-$st env TITANS_TRITON_BWD=split $H3 --wavefront --wavefront-step $st \
      --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_wavefront_step$st.json"
  done
  step 80 mac-65536x1-wavefront-step-2048-timeline env TITANS_TRITON_BWD=split $H3 --wavefront --wavefront-step 2048 \
    --shapes 65536x1 --warmup 1 --iters 1 --profile 30 --out "$RES/h_mac_65536x1_wavefront_step2048_timeline.json"
  test_wavefront 90
  finish
fi
if [ "$PART" = 11 ]; then
  # session 21: PART=10 gave 218.6K (1024-token steps) and 223.1K (2048) against 209.0K (512); the memory kernels ran
  # 1.5x longer beside the other streams (bwd3 296 ms in the step against 196 ms one-pass): the memory blocks' streams
  # at high priority (now the default), and their feed-forward on streams of their own; per-stream timelines
  test_wavefront 60
  WF="env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3"
  step 130 mac-65536x1-wf2048-priority $WF --wavefront-step 2048 --profile 30 \
    --out "$RES/h_mac_65536x1_wf2048_priority.json"
  step 90 mac-65536x1-wf2048-priority-ffn env TITANS_WAVEFRONT_FFN_STREAMS=1 $WF --wavefront-step 2048 --profile 30 \
    --out "$RES/h_mac_65536x1_wf2048_priority_ffn.json"
  step 70 mac-65536x1-wf2048-plain env TITANS_WAVEFRONT_PRIORITY=0 $WF --wavefront-step 2048 \
    --out "$RES/h_mac_65536x1_wf2048_plain.json"
  # the flat ratio's other side in the same call (session 20: 370,025)
  step 100 mac-4096x8 $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8.json"
  step 90 mac-65536x1-wf512-priority $WF --out "$RES/h_mac_65536x1_wf512_priority.json"
  finish
fi
if [ "$PART" = 12 ]; then
  # session 21: PART=11 gave 228.8K (priority), 230.3K (+ feed-forward streams), 225.3K (plain) at 2048-token steps,
  # one run each: a second run of each (alternating), the two-pass memory backward in the wavefront, and decode's peak
  # memory at 1K and 1M of context after the fix of the prefill's leftover views (session 10: 0.32 vs 0.67 GB)
  WF="env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048"
  step 150 mac-65536x1-wf2048-priority-ffn env TITANS_WAVEFRONT_FFN_STREAMS=1 $WF \
    --out "$RES/h_mac_65536x1_wf2048_priority_ffn_2.json"
  step 60 mac-65536x1-wf2048-plain env TITANS_WAVEFRONT_PRIORITY=0 $WF --out "$RES/h_mac_65536x1_wf2048_plain_2.json"
  step 60 mac-65536x1-wf2048-priority $WF --out "$RES/h_mac_65536x1_wf2048_priority_2.json"
  step 70 mac-65536x1-wf2048-priority-ffn-bwd-fused env TITANS_WAVEFRONT_FFN_STREAMS=1 ${WF/BWD=split/BWD=fused} \
    --out "$RES/h_mac_65536x1_wf2048_priority_ffn_bwd_fused.json"
  step 150 decode-mac-graphs python3 benchmarks/harness.py --models mac --shapes --dim 512 --depth 8 --heads 8 \
    --window 512 --memory-layers 2 4 6 --memory-chunk 64 --decode-contexts 1024 1048576 --decode-models mac \
    --decode-steps 30 --decode-graphs --prefill-piece 16384 --out "$RES/h_decode_mac_graphs.json"
  finish
fi
if [ "$PART" = 13 ]; then
  # session 21: PART=12's decode after a 1M-token prefill peaked at 4.30 GB (0.29 at 1K): the rotary tables kept
  # for every position streamed, in every layer; now only the first 65,536 positions are kept
  step 80 decode-mac-graphs python3 benchmarks/harness.py --models mac --shapes --dim 512 --depth 8 --heads 8 \
    --window 512 --memory-layers 2 4 6 --memory-chunk 64 --decode-contexts 1024 1048576 --decode-models mac \
    --decode-steps 30 --decode-graphs --prefill-piece 16384 --out "$RES/h_decode_mac_graphs_bounded_rope.json"
  finish
fi
if [ "$PART" = 14 ]; then
  # next after session 21 (not run yet): decode after a 1M-token prefill still peaked 33 MB (1.11x) above 1K's 0.290 GB
  # after the rotary fix (one 16,384 x 512 float32 piece's worth, not found on the CPU path): where it was allocated
  step 100 decode-mac-graphs-snapshot python3 benchmarks/harness.py --models mac --shapes --dim 512 --depth 8 \
    --heads 8 --window 512 --memory-layers 2 4 6 --memory-chunk 64 --decode-contexts 1024 1048576 --decode-models mac \
    --decode-steps 30 --decode-graphs --decode-snapshot --prefill-piece 16384 --out "$RES/h_decode_mac_snapshot.json"
  finish
fi
if [ "$PART" = 15 ]; then
  # next after session 21 (not run yet): the wavefront's best (230.7K tokens/s at MAC 65536 x 1) with the stream views
  # (TITANS_WAVEFRONT_STREAM_VIEWS=1: the persistent tokens and the tied embedding read through one view per stream,
  # one cross-stream gradient accumulation per stream instead of per block and segment: 1,024 + 256 a step); its GPU
  # tests first, then the views and without them twice each, alternating, and the views' per-stream timeline
  test_wavefront 70
  WF="env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048"
  step 150 mac-65536x1-wf2048-views env TITANS_WAVEFRONT_STREAM_VIEWS=1 $WF --out "$RES/h_wf2048_views.json"
  step 70 mac-65536x1-wf2048-no-views env TITANS_WAVEFRONT_STREAM_VIEWS=0 $WF --out "$RES/h_wf2048_no_views.json"
  step 70 mac-65536x1-wf2048-views-2 env TITANS_WAVEFRONT_STREAM_VIEWS=1 $WF --out "$RES/h_wf2048_views_2.json"
  step 70 mac-65536x1-wf2048-no-views-2 env TITANS_WAVEFRONT_STREAM_VIEWS=0 $WF --out "$RES/h_wf2048_no_views_2.json"
  step 100 mac-65536x1-wf2048-views-timeline env TITANS_WAVEFRONT_STREAM_VIEWS=1 $WF --profile 30 \
    --out "$RES/h_wf2048_views_timeline.json"
  finish
fi
if [ "$PART" = 16 ]; then
  # session 22: PART=14's snapshot put decode's 33 MB at 1M on one more 32 MiB allocation under the static decode's
  # attention projection (a cuBLAS workspace: the 1M decoder's fresh warm-up stream; the 1K decoder's stayed alive);
  # now one warm-up stream per process (side_stream).  Decode again (1K, 1M), the GPU tests of the static decode and
  # the wavefront, then PART=15's stream views against none at MAC 65536 x 1
  step 80 decode-mac-graphs-snapshot python3 benchmarks/harness.py --models mac --shapes --dim 512 --depth 8 \
    --heads 8 --window 512 --memory-layers 2 4 6 --memory-chunk 64 --decode-contexts 1024 1048576 --decode-models mac \
    --decode-steps 30 --decode-graphs --decode-snapshot --prefill-piece 16384 --out "$RES/h_decode_mac_side_stream.json"
  step 60 gpu-test-static-decode sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_static_decode.py \
    > $RES/gpu_test_static_decode.txt 2>&1"
  test_wavefront 70
  WF="env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048"
  step 150 mac-65536x1-wf2048-views env TITANS_WAVEFRONT_STREAM_VIEWS=1 $WF --out "$RES/h_wf2048_views.json"
  step 70 mac-65536x1-wf2048-no-views env TITANS_WAVEFRONT_STREAM_VIEWS=0 $WF --out "$RES/h_wf2048_no_views.json"
  finish
fi
if [ "$PART" = 17 ]; then
  # session 22: the memory kernels load q / k / v / dy in their own dtype and read the state from the caller's buffers
  # (seven fewer copy launches a call each way, ~14 of the ~220 a memory block's segment chain launches); their GPU
  # tests, their time at MAC's segment shape, then MAC 65536 x 1 (wavefront, 2048-token steps, twice) and 4096 x 8
  step 90 kernel-tests sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    > $RES/gpu_test_fused_memory.txt 2>&1"
  step 45 memory-kernels-split-b1 env TITANS_TRITON_BWD=split python3 benchmarks/memory_kernels.py --backends triton \
    --parts --shapes 1x8x512x64x128x64x2 --out "$RES/memory_kernels_b1_split.json"
  WF="env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048"
  step 150 mac-65536x1-wf2048 $WF --out "$RES/h_wf2048.json"
  step 70 mac-65536x1-wf2048-2 $WF --out "$RES/h_wf2048_2.json"
  step 100 mac-4096x8 $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8.json"
  finish
fi
if [ "$PART" = 18 ]; then
  # session 22: PART=17's kernel tests ran out of their 90 s before the GPU ones: those alone; then each pass of the
  # memory kernels at MAC's segment shape with 16 warps (PART=17: 8), and MAC 65536 x 1 with 16 warps for the
  # passes where that was >= 5% faster (TITANS_TRITON_PASS_WARPS), if any
  step 150 kernel-tests-gpu sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py -k on_gpu \
    > $RES/gpu_test_fused_memory_on_gpu.txt 2>&1"
  step 60 memory-kernels-split-b1-warps16 env TITANS_TRITON_BWD=split TITANS_TRITON_WARPS=16 python3 \
    benchmarks/memory_kernels.py --backends triton --parts --shapes 1x8x512x64x128x64x2 \
    --out "$RES/memory_kernels_b1_split_warps16.json"
  SPEC=$(python3 - "$RES/memory_kernels_b1_split_warps16.json" <<'PY' 2>> "$LOG"
import json, sys
w8 = json.load(open("benchmarks/results/memory_kernels_h200_session22_b1_split.json"))["rows"][0]["triton_parts"]
w16 = json.load(open(sys.argv[1]))["rows"][0]["triton_parts"]
names = {"_memory_fwd_kernel MODE 1": "fwd1", "_memory_fwd_kernel MODE 2": "fwd2", "_memory_bwd3_kernel STAGE 0":
         "stage0", "_memory_bwd3_kernel STAGE 1": "stage1", "_memory_bwd3_kernel STAGE 2": "stage2"}
print(",".join(f"{p}=16" for k, p in names.items() if w16["pass_ms"][k] < 0.95 * w8["pass_ms"][k]))
PY
)
  echo "passes faster with 16 warps: '$SPEC'" >> "$LOG"
  if [ -n "$SPEC" ]; then
    step 150 mac-65536x1-wf2048-pass-warps env TITANS_TRITON_BWD=split TITANS_TRITON_PASS_WARPS="$SPEC" $H3 \
      --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048 --out "$RES/h_wf2048_pass_warps.json"
  fi
  finish
fi
if [ "$PART" = 19 ]; then
  # session 22: PART=18's GPU kernel tests were cut at 150 s after two of three (a fresh machine compiles each backward's
  # kernels): the three-launch one alone, which also feeds bf16 q / k / v (the kernels load them as they are)
  kernel_tests 200 kernel-tests-gpu-split 'on_gpu and split' gpu_test_fused_memory_on_gpu_split.txt
  finish
fi
if [ "$PART" = 20 ]; then
  # session 22: MAC's segment read-outs on the feed-forward's stream (TITANS_WAVEFRONT_READOUT_STREAMS=1): the memory
  # core split in a walk and a read-out, whose backward (stage 0 among it, 0.27 ms a segment) leaves the chain; the
  # same row as PART=16/17's (230.1-231.0K without it); one run (the device time left)
  step 150 mac-65536x1-wf2048-readouts env TITANS_TRITON_BWD=split TITANS_WAVEFRONT_READOUT_STREAMS=1 $H3 --wavefront \
    --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048 --out "$RES/h_wf2048_readouts.json"
  finish
fi
if [ "$PART" = 21 ]; then
  # session 23: PART=20 (never run) and its baseline in the same call, so that the two rows share a machine; then the
  # split core's GPU kernel tests (PART=19, cut in session 22)
  step 150 mac-65536x1-wf2048-readouts env TITANS_TRITON_BWD=split TITANS_WAVEFRONT_READOUT_STREAMS=1 $H3 --wavefront \
    --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048 --out "$RES/h_wf2048_readouts.json"
  step 130 mac-65536x1-wf2048-baseline env TITANS_TRITON_BWD=split $H3 --wavefront \
    --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048 --out "$RES/h_wf2048_baseline.json"
  kernel_tests 200 kernel-tests-gpu-split 'on_gpu and split' gpu_test_fused_memory_on_gpu_split.txt
  finish
fi
if [ "$PART" = 22 ]; then
  # session 23: PART=21 put the read-outs on the feed-forward's stream at 193.0K vs 226.0K without (slower: the split
  # walk recomputes each chunk's inner forward, 128 vs 100 tensor-core instructions).  Now the forward's walk stores
  # the inner forward (z, u, dl, err) and no backward stage recomputes it (TITANS_TRITON_SAVE_INNER, default on):
  # 65536 x 1 with it, without it (the control, same machine), with it and the read-outs apart; MAC 4096 x 8 with it
  # (the speed and memory targets: +1.75 KB a token, head and memory layer); the GPU kernel tests of both backwards
  step 150 mac-65536x1-wf2048-inner env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_inner.json"
  step 115 mac-65536x1-wf2048-recompute env TITANS_TRITON_BWD=split TITANS_TRITON_SAVE_INNER=0 $WF \
    --out "$RES/h_wf2048_recompute.json"
  step 115 mac-65536x1-wf2048-inner-readouts env TITANS_TRITON_BWD=split TITANS_WAVEFRONT_READOUT_STREAMS=1 $WF \
    --out "$RES/h_wf2048_inner_readouts.json"
  step 110 mac-4096x8-inner $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_inner.json"
  kernel_tests 90 kernel-tests-gpu 'on_gpu and (split or overlap)' gpu_test_fused_memory_on_gpu.txt
  finish
fi
if [ "$PART" = 23 ]; then
  # session 23: PART=22's kernel-test step was cut (its rows ran long on a fresh machine): the three-launch backward's
  # GPU test with the forward's inner forward saved (TITANS_TRITON_SAVE_INNER=1, now opt-in), which also runs the split
  # core with and without it; the device time left fits this step alone
  step 170 kernel-tests-gpu-inner sh -c "TITANS_TRITON_SAVE_INNER=1 python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/test_fused_memory.py -k 'on_gpu and split' > $RES/gpu_test_fused_memory_on_gpu_inner.txt 2>&1"
  finish
fi
if [ "$PART" = 24 ]; then
  # session 24: the walks spread over P programs a head (TITANS_TRITON_WALK_PARTS; one (C, D) all-reduce a chunk
  # through global memory).  Each pass at MAC's segment shape at batch 1 for P = 1, 2, 4 (8 warps) and 2, 4 (4 warps),
  # the parts' GPU tests (the all-reduce runs only on a GPU), then MAC 65536 x 1 with P = 4
  MK="python3 benchmarks/memory_kernels.py --backends triton --parts --shapes 1x8x512x64x128x64x2"
  for P in 1 2 4; do
    step 70 "kernels-b1-parts$P" env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_PARTS=$P $MK \
      --out "$RES/memory_kernels_b1_parts$P.json"
  done
  for P in 2 4; do
    step 45 "kernels-b1-parts$P-warps4" env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_PARTS=$P \
      TITANS_TRITON_PASS_WARPS=fwd1=4,stage1=4 $MK --out "$RES/memory_kernels_b1_parts${P}_warps4.json"
  done
  kernel_tests 120 kernel-tests-gpu-parts 'walks_over_parts' gpu_test_fused_memory_parts.txt
  step 150 mac-65536x1-wf2048-parts4 env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_PARTS=4 $WF \
    --out "$RES/h_wf2048_parts4.json"
  finish
fi
if [ "$PART" = 25 ]; then
  # session 24: PART=24 timed the walks over parts (forward walk 0.242 -> 0.165 ms, backward 0.374 -> 0.271 with 2
  # parts at 8 warps) and MAC 65536 x 1 at 255.7K tokens/s with 4 parts - but 4 parts at 8 warps hit an illegal memory
  # access in the kernel benchmark and test, so 64 hidden units a program at least now, 2 parts the default.  Its GPU
  # tests (every backward mode, the parts with and without the inner forward), then MAC 65536 x 1 with 2 parts and with
  # one (the control, same machine)
  kernel_tests 150 kernel-tests-gpu 'on_gpu' gpu_test_fused_memory_on_gpu.txt
  step 150 mac-65536x1-wf2048-parts2 env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_parts2.json"
  step 130 mac-65536x1-wf2048-parts1 env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_PARTS=1 $WF \
    --out "$RES/h_wf2048_parts1.json"
  step 120 mac-65536x1-wf2048-parts2-again env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_parts2_again.json"
  finish
fi
if [ "$PART" = 26 ]; then
  # session 24: PART=25 timed MAC 65536 x 1 at 254.5K / 251.4K tokens/s with the walks over 2 parts (the default now)
  # and 231.4K with one (same machine); its kernel-test step was cut at 150 s.  The parts' GPU tests (with and without
  # the inner forward saved; the one-program walks as the control) and the three-launch backward's, then the timeline
  # of the 65536 x 1 step with 2 parts (where the chain's time goes now)
  kernel_tests 220 kernel-tests-gpu-parts 'walks_over_parts or (on_gpu and split)' gpu_test_fused_memory_parts.txt
  step 150 mac-65536x1-wf2048-parts2-timeline env TITANS_TRITON_BWD=split $H3 --wavefront --shapes 65536x1 \
    --warmup 1 --iters 1 --wavefront-step 2048 --profile 30 --out "$RES/h_wf2048_parts2_timeline.json"
  finish
fi
if [ "$PART" = 27 ]; then
  # session 24: the memory read-out off the chain (TITANS_WAVEFRONT_READOUT_STREAMS=1, 14.6% slower in session 23, its
  # walk's backward recomputing each chunk's inner forward) with the inner forward saved, so that walk reads it and
  # runs over 2 parts like the one-node core's; the default (2 parts, one-node core) as the control; then the split
  # core's GPU test (with and without the inner forward, bf16 q / k / v)
  step 150 mac-65536x1-wf2048-readouts-inner env TITANS_TRITON_BWD=split TITANS_WAVEFRONT_READOUT_STREAMS=1 \
    TITANS_TRITON_SAVE_INNER=1 $WF --out "$RES/h_wf2048_readouts_inner.json"
  step 110 mac-65536x1-wf2048-parts2-control env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_parts2_control.json"
  kernel_tests 120 kernel-tests-gpu-split 'on_gpu and split' gpu_test_fused_memory_on_gpu_split.txt
  finish
fi
if [ "$PART" = 28 ]; then
  # session 24, after its last call: the walks over parts launch with grid (P, BH) instead of (BH, P) (a head's parts
  # neighbours in launch order) and at most a quarter of the GPU's SMs a walk: their GPU tests first, then MAC 65536 x 1
  # with 2 parts and with one (same machine; PART=25: 254.5K / 251.4K vs 231.4K), then MAC 4096 x 8 (its one-launch
  # backward shares the walks' helpers since the review: same arithmetic, static spills 3,648 vs 3,600 B a thread)
  # (every backward mode's GPU test: the one-launch backward's code changed too; 5 of these took 174 s in PART=26)
  kernel_tests 230 kernel-tests-gpu 'on_gpu' gpu_test_fused_memory_on_gpu.txt
  step 130 mac-65536x1-wf2048-parts2 env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_parts2.json"
  step 110 mac-65536x1-wf2048-parts1 env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_PARTS=1 $WF \
    --out "$RES/h_wf2048_parts1.json"
  step 100 mac-4096x8 $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8.json"
  finish
fi
if [ "$PART" = 29 ]; then
  # session 25: PART=28 (never started: no machine) first - every backward mode's GPU test after session 24's grid
  # order (P, BH), SM bound and helper refactor, and MAC 65536 x 1 with the default settings (2 parts; PART=25:
  # 254.5K / 251.4K) - then two kernel-count experiments on the same row: inductor's horizontal fusion of independent
  # kernels (combo_kernels, through TITANS_INDUCTOR_OPTIONS; the backward chain is ~140 kernels a segment) and
  # 4096-token wavefront steps (session 21: 512 -> 1024 -> 2048 gave +4.6%, +2.1%)
  kernel_tests 210 kernel-tests-gpu 'on_gpu' gpu_test_fused_memory_on_gpu.txt
  step 120 mac-65536x1-wf2048 env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048.json"
  step 150 mac-65536x1-wf2048-combo env TITANS_TRITON_BWD=split TITANS_INDUCTOR_OPTIONS='{"combo_kernels": true}' \
    $WF --out "$RES/h_wf2048_combo.json"
  step 110 mac-65536x1-wf4096 env TITANS_TRITON_BWD=split $WF4 \
    --out "$RES/h_wf4096.json"
  finish
fi
if [ "$PART" = 30 ]; then
  # session 25: PART=29's kernel tests were cut at 210 s after three passes (a fresh machine) and its default 65536 x 1
  # row at 120 s (compiling); its combo-kernels row gave 265,994 tokens/s (PART=25: 254.5K / 251.4K by default) and
  # 4096-token steps 157,207. Now: the walks' parts GPU test (grid (P, BH), never run yet), the default row and the
  # combo row on one machine, and MAC 4096 x 8 with combo kernels and without (the ratio's denominator)
  COMBO='{"combo_kernels": true}'
  kernel_tests 120 kernel-tests-gpu-parts 'on_gpu and parts' gpu_test_fused_memory_on_gpu_parts.txt
  step 160 mac-65536x1-wf2048 env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048.json"
  step 100 mac-65536x1-wf2048-combo env TITANS_TRITON_BWD=split TITANS_INDUCTOR_OPTIONS="$COMBO" $WF \
    --out "$RES/h_wf2048_combo.json"
  step 100 mac-4096x8-combo env TITANS_INDUCTOR_OPTIONS="$COMBO" $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_combo.json"
  step 90 mac-4096x8 $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8.json"
  finish
fi
if [ "$PART" = 31 ]; then
  # session 25: PART=30 on one machine: MAC 65536 x 1 249,909 tokens/s by default, 261,607 with combo kernels (+4.7%),
  # MAC 4096 x 8 362,934 by default; its 4096 x 8 combo row was cut at 100 s (compiling). That row first (the
  # ratio's denominator with the same options), then the parts GPU tests PART=30 did not reach (the inner forward
  # saved; PART=30 passed [0-1] and [0-2])
  step 220 mac-4096x8-combo env TITANS_INDUCTOR_OPTIONS='{"combo_kernels": true}' $H3 --shapes 4096x8 --warmup 2 \
    --iters 5 --out "$RES/h_mac_4096x8_combo.json"
  step 140 kernel-tests-gpu-parts-inner sh -c "python3 -m pytest -q -p no:cacheprovider -rfE \
    'tests/test_fused_memory.py::test_triton_walks_over_parts_on_gpu[1-2]' \
    'tests/test_fused_memory.py::test_triton_walks_over_parts_on_gpu[1-1]' > $RES/gpu_test_parts_inner.txt 2>&1"
  finish
fi
if [ "$PART" = 32 ]; then
  # session 25, after its device time: deferred weight gradients (TITANS_DEFER_WEIGHT_GRADS=1, titans/utils/weight_grads.py:
  # a MAC segment's backward graph 628 -> 557 ops, 34 -> 23 matmuls on the CPU; the sums on a stream of their own
  # in the wavefront). MAC 65536 x 1 by default and deferred, its GPU test, then deferred + combo kernels (PART=30:
  # 249.9K default, 261.6K combo), then MAC 4096 x 8 deferred + combo (PART=31 combo alone: 375.6K), and combo
  # kernels' float64 compile check on the GPU
  COMBO='{"combo_kernels": true}'
  step 140 mac-65536x1-wf2048 env TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048.json"
  step 100 mac-65536x1-wf2048-deferred env TITANS_TRITON_BWD=split TITANS_DEFER_WEIGHT_GRADS=1 $WF \
    --out "$RES/h_wf2048_deferred.json"
  weight_grad_tests 80
  step 100 mac-65536x1-wf2048-deferred-combo env TITANS_TRITON_BWD=split TITANS_DEFER_WEIGHT_GRADS=1 \
    TITANS_INDUCTOR_OPTIONS="$COMBO" $WF --out "$RES/h_wf2048_deferred_combo.json"
  step 130 mac-4096x8-deferred-combo env TITANS_DEFER_WEIGHT_GRADS=1 TITANS_INDUCTOR_OPTIONS="$COMBO" $H3 \
    --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_deferred_combo.json"
  # combo kernels' exactness on the GPU (float64, MAC's compiled segment regions; inductor's own check of them)
  combo_compile_check 40
  finish
fi
if [ "$PART" = 33 ]; then
  # session 25 (for the call after PART=32): where a 65536 x 1 step's time goes with the weight gradients deferred,
  # against session 24's timeline (benchmarks/results/harness_h200_session24_mac_65536x1_wf2048_parts2_timeline.json:
  # ~17,800 kernels and ~157 ms of kernel time on each memory block's backward stream); with and without combo
  # kernels
  COMBO='{"combo_kernels": true}'
  step 170 mac-65536x1-wf2048-deferred-timeline env TITANS_TRITON_BWD=split TITANS_DEFER_WEIGHT_GRADS=1 $H3 \
    --wavefront --shapes 65536x1 --warmup 1 --iters 1 --wavefront-step 2048 --profile 30 \
    --out "$RES/h_wf2048_deferred_timeline.json"
  step 150 mac-65536x1-wf2048-deferred-combo-timeline env TITANS_TRITON_BWD=split TITANS_DEFER_WEIGHT_GRADS=1 \
    TITANS_INDUCTOR_OPTIONS="$COMBO" $H3 --wavefront --shapes 65536x1 --warmup 1 --iters 1 --wavefront-step 2048 \
    --profile 30 --out "$RES/h_wf2048_deferred_combo_timeline.json"
  finish
fi
if [ "$PART" = 34 ]; then
  # session 26: PART=32 (one machine) gave MAC 65536 x 1 250.5K by default, 261.3K with the weight gradients deferred,
  # 270.4K deferred + combo kernels, and 4096 x 8 deferred + combo 364.2K (0.742x); its combo compile check was cut
  # at 40 s (197 s on the 2-core CPU).  Before either becomes the default: 4096 x 8 by default, deferred, and
  # deferred + combo on one machine, then combo kernels' float64 compile check on the GPU with room
  COMBO='{"combo_kernels": true}'
  step 130 mac-4096x8 $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8.json"
  step 100 mac-4096x8-deferred env TITANS_DEFER_WEIGHT_GRADS=1 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_deferred.json"
  step 100 mac-4096x8-deferred-combo env TITANS_DEFER_WEIGHT_GRADS=1 TITANS_INDUCTOR_OPTIONS="$COMBO" $H3 \
    --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_deferred_combo.json"
  combo_compile_check 180
  finish
fi
if [ "$PART" = 35 ]; then
  # session 26: PART=34 (one machine): MAC 4096 x 8 369.8K by default, 365.7K deferred, 370.6K deferred + combo; the
  # combo compile check exact on the GPU (2.2e-15).  Now the defaults: combo kernels on, weight gradients deferred in
  # the wavefront.  Their float64 compile check for MAG / MAL / LMM on the GPU, MAC 65536 x 1 with the defaults (no
  # switch in the environment but the backward mode), and its timeline (PART=33's, with the defaults)
  step 200 compile-check-defaults python3 benchmarks/compile_check.py --device cuda --scope blocks \
    --variants mag mal lmm --out "$RES/compile_check_cuda_defaults.json"
  mac_65536x1_defaults 140
  mac_65536x1_timeline 150
  finish
fi
if [ "$PART" = 36 ]; then
  # session 26 (for the next session's first call): PART=35's compile check with the defaults (combo kernels on)
  # finished MAG only (exact, 1.1e-15; 110 s a variant on a fresh machine) before its 200 s: MAL and LMM; then the
  # flat-scaling pair with the defaults on one machine (PART=35: 65536 x 1 279.5K, its 4096 x 8 not timed there)
  step 260 compile-check-defaults-mal-lmm python3 benchmarks/compile_check.py --device cuda --scope blocks \
    --variants mal lmm --out "$RES/compile_check_cuda_defaults_mal_lmm.json"
  mac_65536x1_defaults 140
  mac_4096x8_defaults 130
  finish
fi
if [ "$PART" = 37 ]; then
  # session 27: PART=36 (one machine): MAL / LMM compile check exact with combo kernels on the GPU (1.2e-15 / 8.3e-16),
  # MAC 4096 x 8 372.8K by default, its 65536 x 1 cut at 140 s (compiling on a fresh machine).  New since: the
  # elementwise parameters' gradients deferred too (segment_param stand-ins), the memory coefficients contiguous
  # where they are computed and dq / dk / dv cast in the compiled graph (13 eager launches a MAC segment fewer on the
  # chain on the CPU count).  MAC 65536 x 1 with the defaults (room to compile), the deferral's GPU test, the
  # step's timeline with each busy stream's kernels by name, then the three-launch backward's GPU test (its q / k / v
  # gradients now leave the op in float32)
  mac_65536x1_defaults 200
  weight_grad_tests 60
  mac_65536x1_timeline 150
  kernel_tests 140 gpu-test-kernels-split 'on_gpu and split' gpu_test_fused_memory_split.txt
  finish
fi
if [ "$PART" = 38 ]; then
  # session 27: PART=37 gave MAC 65536 x 1 276.4K with this session's changes (session 26, another machine: 279.5K);
  # its timeline: each backward chain 9,498 kernels (10,611) in the same 166 ms span, the forward chains 2.9 ms more
  # kernel time (a new 25 us fused kernel a segment: q / k normalise with the coefficients made contiguous?).  Same
  # machine A/B: this tree, session 26's code (git archive of 2c3ed80 in old_s26/, copied by the caller), this tree
  # with the coefficients' strided views back (monkeypatched), and MAC 4096 x 8 for the flat ratio
  mac_65536x1_defaults 170
  step 160 mac-65536x1-wf2048-session26-code sh -c "cd old_s26 && PYTHONPATH=/tmp/site:\$PWD TITANS_TRITON_BWD=split \
    $WF --out $RES/h_wf2048_session26_code.json"
  mac_4096x8_defaults 130
  STRIDED="import runpy, sys; import titans.core.memory.fused_update as f; from titans.core.memory.functional import \
decay_coefficients as dc
def strided(lr, eta, forget, C):
    B, H, T = lr.shape; N = T // C
    G, P, Bc, M, m = dc(lr.reshape(B, H, N, C), eta.reshape(B, H, N, C), 1 - forget.reshape(B, H, N, C))
    return (G.reshape(B, H, T), Bc.reshape(B, H, T), M, M[..., -1, :], m, G[..., -1], Bc[..., -1], P[..., -1])
f.chunk_coefficients = strided; sys.argv = ['benchmarks/harness.py'] + sys.argv[1:]
runpy.run_path('benchmarks/harness.py', run_name='__main__')"
  step 125 mac-65536x1-wf2048-strided-coefficients env TITANS_TRITON_BWD=split python3 -c "$STRIDED" \
    ${WF#python3 benchmarks/harness.py} --out "$RES/h_wf2048_strided_coefficients.json"
  finish
fi
if [ "$PART" = 39 ]; then
  # session 27, the device time left (~180 s of a command): the one-launch backward's GPU test (the default below the
  # wavefront, e.g. MAC 4096 x 8), now that dq / dk / dv leave the op in float32 (PART=37 checked the three-launch one)
  kernel_tests 170 gpu-test-kernels-overlap 'on_gpu and overlap' gpu_test_fused_memory_overlap.txt
  finish
fi
if [ "$PART" = 40 ]; then
  # session 27 (for the next session's first call): the backward walk took 0.386 ms a segment in the 65536 x 1 step
  # (PART=37's timeline) against 0.271 ms alone (session 24): do the memory ops contend with each other?  The op's
  # forward + backward at MAC's segment shape on 1, 2 and 3 streams in one CUDA graph (benchmarks/memory_contention.py,
  # new, never run on a GPU), then MAC 65536 x 1 and 4096 x 8 with the defaults on one machine
  step 150 memory-contention env TITANS_TRITON_BWD=split python3 benchmarks/memory_contention.py \
    --out "$RES/memory_contention.json"
  mac_65536x1_defaults 170
  mac_4096x8_defaults 130
  finish
fi
if [ "$PART" = 41 ]; then
  # session 28: PART=40 (one machine): the backward walk 0.200 ms alone in a CUDA graph, 0.231 / 0.247 with 2 / 3 side
  # by side, 0.386 in the step; MAC 65536 x 1 276.2K vs 4096 x 8 375.3K (0.736x).  A walk program at 8 warps and 255
  # registers a thread holds a whole SM's register file, so it starts only on an SM that every other kernel has left;
  # at 4 warps (half an SM; 0.266 vs 0.271 ms alone in session 24) it may start sooner beside the other streams.
  # In-step A/B of the warps of the backward passes (TITANS_TRITON_PASS_WARPS), the defaults last as the control
  step 100 memory-contention-stage1-w4 env TITANS_TRITON_BWD=split TITANS_TRITON_PASS_WARPS=stage1=4 python3 \
    benchmarks/memory_contention.py --out "$RES/memory_contention_stage1_w4.json"
  step 160 mac-65536x1-wf2048-stage1-w4 env TITANS_TRITON_BWD=split TITANS_TRITON_PASS_WARPS=stage1=4 $WF \
    --out "$RES/h_wf2048_stage1_w4.json"
  step 100 mac-65536x1-wf2048-stages-w4 env TITANS_TRITON_BWD=split TITANS_TRITON_PASS_WARPS=stage0=4,stage1=4,stage2=4 \
    $WF --out "$RES/h_wf2048_stages_w4.json"
  mac_65536x1_defaults 100
  finish
fi
if [ "$PART" = 42 ]; then
  # session 28: PART=41 (one machine): the backward passes at 4 warps gain nothing in the step (stage 1 at 4: 272.1K,
  # stages 0-2 at 4: 268.9K, 8 warps: 273.2K) and the 4-warp walks slow each other more (0.309 vs 0.247 ms three side
  # by side).  Now the backward walk with the state gradient carried in registers (TITANS_TRITON_WALK_CARRY=registers,
  # new): its GPU test, the contention script, MAC 65536 x 1 with it, then the defaults as the control (the switch was
  # removed after this call, no faster: commit 5ec4a2c has it)
  kernel_tests 120 gpu-test-walk-carry "walks_over_parts_on_gpu and registers" gpu_test_walk_carry.txt
  step 60 memory-contention-carry env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CARRY=registers python3 \
    benchmarks/memory_contention.py --out "$RES/memory_contention_carry.json"
  step 150 mac-65536x1-wf2048-carry env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CARRY=registers $WF \
    --out "$RES/h_wf2048_carry.json"
  mac_65536x1_defaults 100
  finish
fi
if [ "$PART" = 43 ]; then
  # session 28: PART=42 (one machine): the walk with the state gradient in registers 277.8K vs 274.9K (+1.1%, the
  # noise; alone in a graph 0.220 vs 0.200 ms slotted in PART=40): not the lever.  The ~60 small inductor kernels a
  # segment of each backward chain (10-15 us each): MAC 65536 x 1 with inductor's aggressive fusion (fuses nodes
  # that share no buffer too), then the defaults as the control
  step 160 mac-65536x1-wf2048-aggressive env TITANS_TRITON_BWD=split \
    TITANS_INDUCTOR_OPTIONS='{"aggressive_fusion": true}' $WF --out "$RES/h_wf2048_aggressive.json"
  mac_65536x1_defaults 95
  finish
fi
if [ "$PART" = 44 ]; then
  # session 28 (for the next session's first call): PART=43 (one machine): inductor's aggressive fusion 280.6K vs
  # 280.5K by default: no change; none of 4 warps, the register-carried walk, aggressive fusion moved the step.  The
  # step's CUDA graph runs ~20 streams' branches side by side on CUDA's default 8 hardware work queues, where branches
  # sharing a queue wait on each other (false dependencies): MAC 65536 x 1 by default, then with 32 queues; then
  # the memory ops with 4096^2 bf16 matmuls on a stream beside them (does a throughput neighbour stretch the walk from
  # 0.247 to the step's 0.386 ms?); one memory layer alone (layer 4) under the profiler: its walks and stages without
  # the other two chains beside.  The two 65536 x 1 rows also profile one step after their timed ones (the timeline's
  # new "beside": what ran next to the walks and stages)
  mac_65536x1_defaults 185 --profile 30
  step 130 mac-65536x1-wf2048-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 TITANS_TRITON_BWD=split $WF \
    --profile 30 --out "$RES/h_wf2048_connections32.json"
  step 80 memory-contention-background env TITANS_TRITON_BWD=split python3 benchmarks/memory_contention.py \
    --background 0 4096 --out "$RES/memory_contention_background.json"
  step 150 mac-65536x1-wf2048-one-memory-layer-timeline env TITANS_TRITON_BWD=split $H3 --memory-layers 4 \
    --wavefront --shapes 65536x1 --warmup 1 --iters 1 --wavefront-step 2048 --profile 30 \
    --out "$RES/h_wf2048_one_memory_layer_timeline.json"
  finish
fi
if [ "$PART" = 45 ]; then
  # session 28 (for the next session's second call, after PART=44): cuBLAS matmuls asked to leave SMs free
  # (TITANS_MATMUL_SM_CARVEOUT, torch's experimental carveout: new): first the contention script with 4096^2 matmuls
  # beside the memory ops and 48 SMs carved out (does the walk get back what the neighbour took; do the matmuls run on
  # fewer SMs, i.e. longer?), then MAC 65536 x 1 with 32 and with 64 SMs carved out, then the defaults
  step 80 memory-contention-background-carveout48 env TITANS_TRITON_BWD=split TITANS_MATMUL_SM_CARVEOUT=48 python3 \
    benchmarks/memory_contention.py --background 0 4096 --out "$RES/memory_contention_background_carveout48.json"
  step 170 mac-65536x1-wf2048-carveout32 env TITANS_MATMUL_SM_CARVEOUT=32 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_carveout32.json"
  step 100 mac-65536x1-wf2048-carveout64 env TITANS_MATMUL_SM_CARVEOUT=64 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_carveout64.json"
  mac_65536x1_defaults 100
  finish
fi
if [ "$PART" = 46 ]; then
  # session 29: PART=44 (one machine): 32 hardware work queues 276.8K vs 281.5K by default (no gain); 4096^2 matmuls
  # beside the memory ops stretch the backward walk only 5% (211 vs 200 us alone; three walks side by side: 284);
  # one memory layer alone: its walk 0.263 ms a segment in the step, against 0.349 with the three chains.  So the
  # walks slow each other, not the matmuls.  Is it their programs waiting for a partner to get an SM (a walk over 2
  # parts spins until both run), or each program running slower?  TITANS_TRITON_WALK_CLOCK=1 (new) stamps every walk
  # program's start, first all-reduce and end: first the contention script, then MAC 65536 x 1 with three memory
  # layers and with one, then the defaults without the clock (its cost), then the clock's GPU test.  The GPU's SM
  # clock and power are sampled all along (smi.csv: is the step's clock lower than the script's?)
  smi_start
  step 80 memory-contention-walk-clock env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 \
    benchmarks/memory_contention.py --background 0 4096 --out "$RES/memory_contention_walk_clock.json"
  step 185 mac-65536x1-wf2048-walk-clock env TITANS_TRITON_WALK_CLOCK=1 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_walk_clock.json"
  step 100 mac-65536x1-wf2048-one-memory-layer-walk-clock env TITANS_TRITON_WALK_CLOCK=1 TITANS_TRITON_BWD=split \
    $H3 --memory-layers 4 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048 \
    --out "$RES/h_wf2048_one_memory_layer_walk_clock.json"
  mac_65536x1_defaults 100
  kernel_tests 90 gpu-test-walk-clock walk_clock gpu_test_walk_clock.txt
  kill $SMI  # smi_start's sampler
  finish
fi
if [ "$PART" = 47 ]; then
  # session 29: PART=46 (one machine; the walk clock's first GPU run; its JSON failed on a tensor, the log kept the
  # numbers): in MAC 65536 x 1 the backward walk's programs all start within 2.2 us of each other and no partner
  # waits (late partner 0.1 us a head), yet each program runs 357.6 us (one memory layer: 269.0; alone in a graph
  # ~200): the walks run slower, they do not wait.  The SM clock stayed at 1980 MHz (smi.csv).  A program owns its
  # SM (255 registers x 256 threads), so what slows it is outside the SM: the L2 / HBM its loads, stores and
  # spills go through.  Here the contention script with the clock, its neighbours: matmuls (compute), 256 MB copies
  # (HBM bandwidth), 16 MB copies (L2 bandwidth; 96 a replay to cover it)
  smi_start
  step 110 memory-contention-walk-clock env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 \
    benchmarks/memory_contention.py --background 0 4096 --background-copy 256 \
    --out "$RES/memory_contention_walk_clock.json"
  step 70 memory-contention-walk-clock-l2 env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 \
    benchmarks/memory_contention.py --streams 1 3 --background 0 --background-copy 16 --background-reps 96 \
    --out "$RES/memory_contention_walk_clock_l2.json"
  kill $SMI  # smi_start's sampler
  finish
fi
if [ "$PART" = 48 ]; then
  # session 29: PART=47 (one machine): next to 256 MB copies (HBM), 16 MB copies (L2) or 4096^2 matmuls a lone
  # backward walk's programs run 207-210 us against 205-208 without: bandwidth neighbours do not slow it; next to
  # the other memory ops (2 / 3 streams) they run 252 / 307-312 us, with no partner ever waiting to start.  What the
  # walks share beyond bandwidth is their synchronisation through the L2: a walk's 16 flags sit on one cache line.
  # The walks' flags a line apart and / or polled with plain loads (TITANS_TRITON_WALK_FLAGS / _POLL, new) in the
  # contention script with the clock, then MAC 65536 x 1 with both against the defaults, then their GPU tests
  CW="env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 benchmarks/memory_contention.py --streams 1 3"
  step 50 contention-flags-lines env TITANS_TRITON_WALK_FLAGS=lines $CW --out "$RES/mc_flags_lines.json"
  step 40 contention-poll-loads env TITANS_TRITON_WALK_POLL=loads $CW --out "$RES/mc_poll_loads.json"
  step 40 contention-lines-loads env TITANS_TRITON_WALK_FLAGS=lines TITANS_TRITON_WALK_POLL=loads $CW \
    --out "$RES/mc_lines_loads.json"
  step 30 contention-defaults $CW --out "$RES/mc_defaults.json"
  step 170 mac-65536x1-wf2048-lines-loads env TITANS_TRITON_WALK_FLAGS=lines TITANS_TRITON_WALK_POLL=loads \
    TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_lines_loads.json"
  mac_65536x1_defaults 80
  kernel_tests 60 gpu-test-walk-sync meet_through_every_sync_mode gpu_test_walk_sync.txt
  finish
fi
if [ "$PART" = 49 ]; then
  # session 29: PART=48 (one machine): polling the partners' flags with plain loads took the backward walk's
  # programs from 206.6 / 289.8 us (alone / three side by side) to 193.6 / 262.8; flags a line apart alone changed
  # nothing; MAC 65536 x 1 with both 279,337 tokens/s against 273,202 with the former mode.  Both are now the
  # defaults: the flat-scaling pair with them on one machine
  mac_65536x1_defaults 160
  mac_4096x8_defaults 115
  finish
fi
if [ "$PART" = 50 ]; then
  # session 29 (for the next session's first call): PART=49 (one machine): the flat pair with the walks polling
  # their flags with loads by default, 279,970 vs 376,648 tokens/s = 0.743x.  A walk's program still waits on its
  # own flag (set by itself) each step: one acquire read and barrier more at 2 parts; TITANS_TRITON_WALK_POLL=partners
  # (new, interpreter-tested with one part only) waits on the partner's alone.  The contention script with the clock
  # (loads, the default, then partners; the clock now also sums each program's time inside its all-reduces),
  # its GPU tests, MAC 65536 x 1 with partners against the defaults
  CW="env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 benchmarks/memory_contention.py --streams 1 3"
  step 50 contention-loads $CW --out "$RES/mc_loads.json"
  step 40 contention-partners env TITANS_TRITON_WALK_POLL=partners $CW --out "$RES/mc_partners.json"
  kernel_tests 60 gpu-test-walk-sync 'meet_through_every_sync_mode or walk_clock' gpu_test_walk_sync.txt
  step 170 mac-65536x1-wf2048-partners env TITANS_TRITON_WALK_POLL=partners TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_partners.json"
  mac_65536x1_defaults 80
  # the walks over 4 parts, refused on the GPU since session 24's illegal memory access (forward walk, float32
  # q / k / v, the former polling); with the loads polling the backward walk over 4 parts spills 408 B a thread
  # against 1,296 at 2 (kernel_resources.py on the CPU).  Their GPU test (a process of its own), then, if it passed,
  # MAC 65536 x 1 over 4 parts (MIN_WALK_UNITS lowered for that process only)
  kernel_tests 60 gpu-test-four-parts four_parts gpu_test_four_parts.txt
  if grep -qE "^\.\. +\[100%\]" "$RES/gpu_test_four_parts.txt"; then  # both passed (-q prints no summary here)
    mac_65536x1_four_parts 90
  fi
  finish
fi
if [ "$PART" = 51 ]; then
  # session 30: PART=50 (one machine): waiting on the partners' flags only 280,714 vs 280,333 tokens/s by default (no
  # gain, removed); the walk clock's fifth stamp puts 26 / 35 us of the backward walk's 179 / 246 us (alone / three
  # side by side) in its all-reduces: the slowdown is in the walk's own loads and arithmetic.  The walks over 4 parts
  # failed their GPU test with an illegal memory access in the float32 q / k / v case, which took the bf16 case's
  # process down with it.  Here: which tools there are, each case in a process of its own (float32 with
  # CUDA_LAUNCH_BLOCKING=1, so that the error names the launch; under compute-sanitizer if the machine has it), MAC
  # 65536 x 1 over 4 parts if the bf16 case passed (the step's q / k / v are bf16 under autocast), the defaults row
  # beside it, and the contention script at half the segment (256 tokens: half the working set of the memory ops'
  # scratch, ~27 MB for three side by side against ~54 MB and the GPU's 50 MB of L2) against 512
  step 10 tools sh -c "which compute-sanitizer; ls /usr/local/cuda*/bin 2>/dev/null | head -40; nvidia-smi -q | \
    grep -i -A3 'L2\|cache' | head -20"
  kernel_tests 60 gpu-test-four-parts-bf16 'four_parts and True' gpu_test_four_parts_bf16.txt
  step 60 gpu-test-four-parts-f32 sh -c "CUDA_LAUNCH_BLOCKING=1 python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/test_fused_memory.py -k 'four_parts and False' > $RES/gpu_test_four_parts_f32.txt 2>&1"
  if command -v compute-sanitizer > /dev/null; then
    step 90 sanitizer-four-parts-f32 sh -c "compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q \
      -p no:cacheprovider -rfE tests/test_fused_memory.py -k 'four_parts and False' > $RES/sanitizer_four_parts.txt 2>&1"
  fi
  if grep -qE "^\. +\[100%\]" "$RES/gpu_test_four_parts_bf16.txt"; then
    mac_65536x1_four_parts 170
  fi
  mac_65536x1_defaults 80
  CW="env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 benchmarks/memory_contention.py --streams 1 3"
  step 40 contention-256 $CW --shape 1x8x256x64x128x64x2 --out "$RES/mc_256.json"
  step 40 contention-512 $CW --out "$RES/mc_512.json"
  finish
fi
if [ "$PART" = 52 ]; then
  # session 30: PART=51 (one machine): the walks over 4 parts trained at 279,250 tokens/s against 282,591 by default
  # (no gain); compute-sanitizer put the float32 case's illegal access in a tl.dot of the forward walk over 4 parts
  # (an out-of-bounds shared-memory read: Triton's code, not the kernel's indexing); the backward walk three side by
  # side grew less at 256 tokens than at 512.  The 65536 x 1 step's backward chains run ~76 kernels a segment with
  # ~2.3 us between them (session 27's timeline: 144 ms of kernels in a 166 ms span a chain): inductor's programmatic
  # dependent launch (a kernel starts while the one before it drains; TORCHINDUCTOR_ENABLE_PDL=1) and its coordinate
  # descent tuning of the block sizes of the ~60 small kernels a segment, each against the defaults
  step 10 pdl-present python3 -c "import torch._inductor.config as c; print('enable_pdl', \
    getattr(c.triton, 'enable_pdl', 'absent'), 'coordinate_descent_tuning', c.coordinate_descent_tuning)"
  # (the defaults first: each row compiles its own code, the first on a fresh machine also the memory kernels)
  mac_65536x1_defaults 150
  step 150 mac-65536x1-wf2048-pdl env TORCHINDUCTOR_ENABLE_PDL=1 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_pdl.json"
  step 240 mac-65536x1-wf2048-coordinate-descent env TITANS_INDUCTOR_OPTIONS='{"coordinate_descent_tuning": true}' \
    TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_coordinate_descent.json"
  finish
fi
if [ "$PART" = 53 ]; then
  # session 30: PART=52 (one machine): MAC 65536 x 1 278,176 tokens/s by default, 284,484 with inductor's programmatic
  # dependent launch (TORCHINDUCTOR_ENABLE_PDL=1, +2.3%), 285,042 with its coordinate descent tuning (+2.5%, but
  # 233 s to compile against 64-94).  The launch on the issue's shape too (the ratio's denominator), its float64
  # compile check on the GPU (compiled == eager with the kernels' launches overlapped), and 65536 x 1 again
  mac_4096x8_defaults 110
  step 100 mac-4096x8-pdl env TORCHINDUCTOR_ENABLE_PDL=1 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_pdl.json"
  step 130 mac-65536x1-wf2048-pdl env TORCHINDUCTOR_ENABLE_PDL=1 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_pdl.json"
  step 100 compile-check-pdl env TORCHINDUCTOR_ENABLE_PDL=1 python3 benchmarks/compile_check.py --device cuda \
    --scope blocks --variants mac --out "$RES/compile_check_cuda_pdl.json"
  finish
fi
if [ "$PART" = 55 ]; then
  # session 30 (run as session 31's first call): the memory's chunk coefficients (Eq. 16-18) as one Triton kernel a
  # direction (titans/core/memory/coefficient_kernels.py, TITANS_TRITON_COEFFICIENTS=1; == the PyTorch code in float64
  # under the interpreter): in a MAC segment's backward graph the PyTorch code and its recomputation are ~24% of the
  # ops (segment_graph_ops.py --by-source), all on the chain.  Its GPU tests, then MAC 65536 x 1 and 4096 x 8 with it
  # against the defaults
  kernel_tests 60 gpu-test-coefficients 'chunk_coefficients_on_gpu' gpu_test_coefficients.txt
  mac_65536x1_defaults 150
  step 120 mac-65536x1-wf2048-coefficients env TITANS_TRITON_COEFFICIENTS=1 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_coefficients.json"
  step 90 mac-4096x8-coefficients env TITANS_TRITON_COEFFICIENTS=1 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_coefficients.json"
  mac_4096x8_defaults 90
  finish
fi
if [ "$PART" = 56 ]; then
  # session 31: PART=55 (one machine): the fused coefficients 290,117 tokens/s at MAC 65536 x 1 against 283,309 with
  # the defaults; their GPU test failed at chunk 64 by a fixed 1e-4 between two float32 paths, where PyTorch's own
  # float32 is 3e-4 from float64 (now both against float64); both 4096 x 8 rows were cut at 90 s (a fresh machine's
  # first 4096 x 8 compile).  The test again, 4096 x 8 with and without them, 65536 x 1 with them alone and with
  # programmatic dependent launch
  PDL='{"triton.enable_pdl": true}'
  kernel_tests 60 gpu-test-coefficients 'chunk_coefficients_on_gpu' gpu_test_coefficients.txt
  mac_4096x8_defaults 150
  step 110 mac-4096x8-coefficients env TITANS_TRITON_COEFFICIENTS=1 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_coefficients.json"
  step 110 mac-65536x1-wf2048-coefficients env TITANS_TRITON_COEFFICIENTS=1 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_coefficients.json"
  step 110 mac-65536x1-wf2048-coefficients-pdl env TITANS_INDUCTOR_OPTIONS="$PDL" TITANS_TRITON_COEFFICIENTS=1 \
    TITANS_TRITON_BWD=split $WF --out "$RES/h_wf2048_coefficients_pdl.json"
  finish
fi
if [ "$PART" = 57 ]; then
  # session 31: PART=56 (one machine): the fused coefficients' GPU test passes (against float64); 4096 x 8 373,122
  # tokens/s with them, 372,273 without; 65536 x 1 286,626 with them, 288,719 with them and programmatic dependent
  # launch.  They are now the default on CUDA.  65536 x 1 with the new defaults and with TITANS_TRITON_COEFFICIENTS=0
  # on one machine; the read-out streams (TITANS_WAVEFRONT_READOUT_STREAMS=1: the read-out and the memory backward's
  # first stage off each memory block's chain, 14.6% slower in session 23, before the walks over parts, deferred
  # weight gradients and combo kernels) with the new defaults; programmatic dependent launch's float64 compile check
  # (cut at 100 s in PART=53).  (Replaces session 30's PART=54, never run.)
  PDL='{"triton.enable_pdl": true}'
  mac_65536x1_defaults 130
  step 100 mac-65536x1-wf2048-no-coefficients env TITANS_TRITON_COEFFICIENTS=0 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_no_coefficients.json"
  step 110 mac-65536x1-wf2048-readout-streams env TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_readout_streams.json"
  step 150 compile-check-pdl env TITANS_INDUCTOR_OPTIONS="$PDL" python3 benchmarks/compile_check.py --device cuda \
    --scope blocks --variants mac --out "$RES/compile_check_cuda_pdl.json"
  finish
fi
if [ "$PART" = 58 ]; then
  # session 31: PART=57 (one machine): MAC 65536 x 1 292,963 tokens/s with the fused coefficients (the new default),
  # 285,513 without; read-out streams 211,156.  The flat ratio with the new defaults on one machine: 4096 x 8, then
  # 65536 x 1, then 65536 x 1 with programmatic dependent launch (its GPU compile check passed in PART=57)
  PDL='{"triton.enable_pdl": true}'
  mac_4096x8_defaults 150
  mac_65536x1_defaults 100
  step 90 mac-65536x1-wf2048-pdl env TITANS_INDUCTOR_OPTIONS="$PDL" TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_pdl.json"
  finish
fi
if [ "$PART" = 59 ]; then
  # session 31 (for the next session's first call): PART=58 (one machine): 377,787 tokens/s at 4096 x 8, 288,624 at
  # 65536 x 1 (0.764x), 293,334 with programmatic dependent launch (0.776x), the fused coefficients now the default.
  # Session 29's timeline had ~77 kernels a segment on each memory block's stream (the backward walk 31% of its
  # kernel time, stages 0 and 2 23%, float32 cutlass GEMMs of the coefficients 248 calls): the chain re-ranked with the
  # new defaults, then both shapes on the same machine; first every GPU test of the memory kernels, never run with
  # the fused coefficients as the default
  step 120 kernel-tests sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    > $RES/gpu_test_fused_memory.txt 2>&1"
  mac_65536x1_timeline 130
  mac_4096x8_defaults 110
  mac_65536x1_defaults 100
  finish
fi
if [ "$PART" = 64 ]; then
  # session 32 (with the last 357 s of device time): TITANS_TRITON_BWD=auto, the new default (three launches where
  # the walk runs over parts, else one): the memory op alone at MAC's segment at batch 1 and 8 with the default,
  # checked against the PyTorch core and broken down by kernel (which backward ran), then batch 1 with one launch
  step 100 memory-kernels-auto python3 benchmarks/memory_kernels.py --backends triton --parts --iters 5 \
    --shapes 1x8x512x64x128x64x2 8x8x512x64x128x64x2 --out "$RES/memory_kernels_auto.json"
  step 60 memory-kernels-overlap-b1 env TITANS_TRITON_BWD=overlap python3 benchmarks/memory_kernels.py \
    --backends triton --parts --iters 5 --shapes 1x8x512x64x128x64x2 --out "$RES/memory_kernels_overlap_b1.json"
  finish
fi
if [ "$PART" = 63 ]; then
  # session 32 (for the next session's first call): PART=62 (one machine): MAC 65536 x 1 292,363 tokens/s by default,
  # 292,268 with programmatic dependent launch (no gain on this fourth machine: stays opt-in); PART=64: the memory
  # backward's layout now picks itself (TITANS_TRITON_BWD=auto: three launches at batch 1, as every row here ran).
  # Session 29's timeline put ~44% of a memory block's backward chain in its ~70 small kernels a segment and their
  # gaps; among them the recomputation of the memory's cheap regions (the read's MLP, the output norm and gate:
  # titans.utils.tensors.recompute_when_recorded, chosen in session 14 for memory at 4096 x 8, where keeping them
  # was 3.6% faster; never timed at 65536 x 1, where memory is plentiful).  Both shapes with and without it
  mac_65536x1_defaults 130
  step 110 mac-65536x1-wf2048-kept env TITANS_RECOMPUTE_CHEAP=0 $WF --out "$RES/h_wf2048_kept.json"
  mac_4096x8_defaults 130
  step 110 mac-4096x8-kept env TITANS_RECOMPUTE_CHEAP=0 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_kept.json"
  finish
fi
if [ "$PART" = 99 ]; then
  # for the next session with a GPU (after session 43): stages 0 and 2 of the memory backward over the hidden units
  # a block at a time (TITANS_TRITON_STAGE0_BLOCK / _STAGE2_BLOCK; cross-compiled here at 8 warps, bytes a thread
  # spilled: stage 2 2,000 -> 200 with 64-unit blocks, 0 with 32; stage 0 2,976 -> 1,944 / 1,272).  First their GPU
  # test, then the default row and the blocked ones on the same machine (each row's capture checked against eager)
  # (limits add up past one call: TEST=0 / DEFAULTS=0 / BLOCKS="64" pick a second call's share on a warm machine)
  if [ "${TEST:-1}" = 1 ]; then
    kernel_tests 150 gpu-test-stage-blocks 'stages_over_blocks_of_hidden_units_on_gpu' gpu_test_stage_blocks.txt
  fi
  if [ "${DEFAULTS:-1}" = 1 ]; then
    step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  fi
  for blk in ${BLOCKS:-32 64}; do
    step 100 "mac-65536x1-wf4096-stage2-block$blk" env TITANS_TRITON_STAGE2_BLOCK=$blk $WF4 \
      --out "$RES/h_wf4096_stage2_block$blk.json"
    step 100 "mac-65536x1-wf4096-stages-block$blk" env TITANS_TRITON_STAGE0_BLOCK=$blk \
      TITANS_TRITON_STAGE2_BLOCK=$blk $WF4 --out "$RES/h_wf4096_stages_block$blk.json"
  done
  finish
fi
stage0_warps4_ab() {  # MAC 65536 x 1 by default, then with stage 0 of the memory backward at 4 warps (session 44: two
  # of its programs might then share an SM), on one machine (since session 45 stage 0's default is 4 warps,
  # tk.narrow_warps: the two rows launch the same kernels)
  step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  step 100 mac-65536x1-wf4096-stage0-warps4 env TITANS_TRITON_PASS_WARPS=stage0=4 $WF4 \
    --out "$RES/h_wf4096_stage0_warps4.json"
}
stage_times() {  # each backward stage's own time at the wavefront's segment shape (batch 1, 8 heads, 512 tokens,
  # head dim 64, hidden 128, chunk 64, depth 2: the three launches with the walk over parts), by pass and kernel
  # (memory_kernels.py --parts, which also fails beyond bf16 tolerance against the PyTorch core): stage 0 as it is
  # (~165 us a launch in session 44's trace), at 4 warps (the default since session 45), by blocks of 32, stage 2
  # whole against by 32 (the default since session 44), stage 0 at 16 warps; in order of priority
  local MK="python3 benchmarks/memory_kernels.py --backends triton --parts --iters 20 --shapes 1x8x512x64x128x64x2"
  step 80 memory-kernels-b1-defaults $MK --out "$RES/memory_kernels_b1_defaults.json"
  step 50 memory-kernels-b1-stage0-warps4 env TITANS_TRITON_PASS_WARPS=stage0=4 $MK \
    --out "$RES/memory_kernels_b1_stage0_warps4.json"
  step 50 memory-kernels-b1-stage0-block32 env TITANS_TRITON_STAGE0_BLOCK=32 $MK \
    --out "$RES/memory_kernels_b1_stage0_block32.json"
  step 50 memory-kernels-b1-stage2-whole env TITANS_TRITON_STAGE2_BLOCK=0 $MK \
    --out "$RES/memory_kernels_b1_stage2_whole.json"
  step 50 memory-kernels-b1-stage0-warps16 env TITANS_TRITON_PASS_WARPS=stage0=16 $MK \
    --out "$RES/memory_kernels_b1_stage0_warps16.json"
}
if [ "$PART" = 105 ]; then
  # for a session with a GPU (after session 44): stage 2 by 32 hidden units inside the one-launch backward (batch >= 3,
  # so MAC 4096 x 8: TITANS_TRITON_STAGE2_BLOCK=32; "auto" keeps whole tiles there until this is timed).  Cross-
  # compiled with Triton 3.6 the kernel's stack stays (stage 0's role sets it) but its local loads / stores fall from
  # 2,609 / 2,005 to 1,928 / 1,468.  The GPU test (three launches and the one launch against the PyTorch core), then
  # the 4096 x 8 row by default and so on one machine (a faster 4096 x 8 lowers the flat ratio: it is the denominator)
  kernel_tests 120 gpu-test-stage-blocks 'stages_over_blocks_of_hidden_units_on_gpu' gpu_test_stage_blocks.txt
  mac_4096x8_defaults 150
  step 100 mac-4096x8-stage2-block32 env TITANS_TRITON_STAGE2_BLOCK=32 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_stage2_block32.json"
  step 80 mac-4096x8-defaults-2 $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_defaults_2.json"
  finish
fi
if [ "$PART" = 114 ]; then
  # after session 48 (H100: 6144-token steps 0.921x flat, met; 4096 0.896x): the flat pair in 6144-token steps on
  # whatever machine comes (session 45's H200 ran 4096-token steps: 0.905x), then 5120 and 4096 on the same machine
  mac_4096x8_defaults 110
  step 100 mac-65536x1-wf6144-defaults $WF6 --out "$RES/h_wf6144_defaults.json"
  step 80 mac-65536x1-wf5120 ${WF4/--wavefront-step 4096/--wavefront-step 5120} --out "$RES/h_wf5120.json"
  step 80 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  step 80 mac-65536x1-wf6144-defaults-2 $WF6 --out "$RES/h_wf6144_defaults_2.json"
  finish
fi
if [ "$PART" = 113 ]; then
  # after session 47 (H100: the stream views +0.6%, now the default; 0.895x flat): the flat pair by today's defaults,
  # then wavefront steps of 3072 and 6144 tokens (4096 the default row; session 40: 2048 slower, session 42: 8192
  # slower), the inputs' gradients in their memory order, then the default again on the same machine
  step 110 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 110
  step 90 mac-65536x1-wf3072 ${WF4/--wavefront-step 4096/--wavefront-step 3072} --out "$RES/h_wf3072.json"
  step 90 mac-65536x1-wf6144 ${WF4/--wavefront-step 4096/--wavefront-step 6144} --out "$RES/h_wf6144.json"
  # session 47's opt-in: the batched inputs' gradients handed back in their own memory order (3 of 4 AOTAutograd
  # copies a call and memory block gone)
  step 70 mac-65536x1-wf4096-inputs-layout env TITANS_WAVEFRONT_INPUTS_LAYOUT=1 $WF4 \
    --out "$RES/h_wf4096_inputs_layout.json"
  step 70 mac-65536x1-wf4096-defaults-2 $WF4 --out "$RES/h_wf4096_defaults_2.json"
  finish
fi
if [ "$PART" = 112 ]; then
  # after session 46 (H100: 0.895x with the read-out inner forward and the read-out forward at 4 warps, the defaults
  # now): first the GPU tests of the stage blocks (stage 0 by blocks keeps 8 warps since 4 gave NaN there) and of the
  # split core (its read-out forward at 4 warps now, against the PyTorch core), then the flat pair by default on one
  # machine, then the read-out forward and stage 0 at 2 warps
  kernel_tests 130 gpu-test-stage-blocks stages_over_blocks_of_hidden_units_on_gpu gpu_test_stage_blocks.txt
  kernel_tests 90 gpu-test-readout-inner read_out_reading_the_walks_inner gpu_test_readout_inner.txt
  step 110 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 110
  step 90 mac-65536x1-wf4096-fwd2-warps2 env TITANS_TRITON_PASS_WARPS=fwd2=2 $WF4 \
    --out "$RES/h_wf4096_fwd2_warps2.json"
  step 90 mac-65536x1-wf4096-stage0-warps2 env TITANS_TRITON_PASS_WARPS=stage0=2 $WF4 \
    --out "$RES/h_wf4096_stage0_warps2.json"
  # session 47: stage 2 by 16 hidden units (32 the default since session 44), the read-outs' stream at the chains'
  # priority, then the default again (a second same-machine row)
  step 70 mac-65536x1-wf4096-stage2-block16 env TITANS_TRITON_STAGE2_BLOCK=16 $WF4 \
    --out "$RES/h_wf4096_stage2_block16.json"
  step 70 mac-65536x1-wf4096-readout-urgent env TITANS_WAVEFRONT_READOUT_URGENT=1 $WF4 \
    --out "$RES/h_wf4096_readout_urgent.json"
  step 70 mac-65536x1-wf4096-defaults-2 $WF4 --out "$RES/h_wf4096_defaults_2.json"
  finish
fi
if [ "$PART" = 111 ]; then
  # session 46 on an H100 (read-out inner +0.8% there): with it on, the read-out forward (fwd2) at 4 warps, stage 0
  # by 32 hidden units, then the read-out inner row again
  export TITANS_TRITON_READOUT_INNER=1
  step 100 mac-65536x1-wf4096-ri-fwd2-warps4 env TITANS_TRITON_PASS_WARPS=fwd2=4 $WF4 \
    --out "$RES/h_wf4096_ri_fwd2_warps4.json"
  step 100 mac-65536x1-wf4096-ri-stage0-block32 env TITANS_TRITON_STAGE0_BLOCK=32 $WF4 \
    --out "$RES/h_wf4096_ri_stage0_block32.json"
  step 100 mac-65536x1-wf4096-ri-stage2-warps4 env TITANS_TRITON_PASS_WARPS=stage2=4 $WF4 \
    --out "$RES/h_wf4096_ri_stage2_warps4.json"
  step 100 mac-65536x1-wf4096-readout-inner-3 $WF4 --out "$RES/h_wf4096_readout_inner_3.json"
  finish
fi
if [ "$PART" = 110 ]; then
  # session 46, when no H100 came: the read-out's stage 0 reading the walk's stored inner forward
  # (TITANS_TRITON_READOUT_INNER=1) against the default on one machine, both orders, then that switch's GPU test
  step 100 mac-65536x1-wf4096-readout-inner env TITANS_TRITON_READOUT_INNER=1 $WF4 \
    --out "$RES/h_wf4096_readout_inner.json"
  step 100 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  kernel_tests 90 gpu-test-readout-inner read_out_reading_the_walks_inner gpu_test_readout_inner.txt
  step 100 mac-65536x1-wf4096-readout-inner-2 env TITANS_TRITON_READOUT_INNER=1 $WF4 \
    --out "$RES/h_wf4096_readout_inner_2.json"
  finish
fi
if [ "$PART" = 108 ]; then
  # session 45: stage 0 at 4 warps the default (then tk.stage0_warps, now tk.narrow_warps; PART=102 / 107 on an H200:
  # +2.2%): the flat pair
  step 150 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 110
  finish
fi
if [ "$PART" = 107 ]; then
  # session 45, after PART=102 BOTH=0 on an H200 (stage 0 at 4 warps 347,566 against 340,282 by default, 0.905x):
  # the pair again in the other order on the same machine, then both parallel stages at 4 warps
  step 100 mac-65536x1-wf4096-stage0-warps4 env TITANS_TRITON_PASS_WARPS=stage0=4 $WF4 \
    --out "$RES/h_wf4096_stage0_warps4_again.json"
  step 100 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults_again.json"
  step 100 mac-65536x1-wf4096-stages-warps4 env TITANS_TRITON_PASS_WARPS=stage0=4,stage2=4 $WF4 \
    --out "$RES/h_wf4096_stages_warps4.json"
  finish
fi
if [ "$PART" = 106 ]; then
  # session 45: session 44's batch-1 token spends its extra SM time in the chain's 512-row matmuls (cuBLAS nvjet
  # 64x48 tiles at ~35 TFLOP/s); inductor's autotuned Triton matmul templates (max_autotune_gemm, cut at 280 s while
  # autotuning in session 42) against the default on one machine, the autotuning given the rest of the call
  step 150 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  step 380 mac-65536x1-wf4096-max-autotune-gemm env TITANS_INDUCTOR_OPTIONS='{"max_autotune_gemm": true}' $WF4 \
    --out "$RES/h_wf4096_max_autotune_gemm.json"
  finish
fi
if [ "$PART" = 104 ]; then
  # for the next session with a GPU (after session 44, whose last six starts got no machine): PART=103 and PART=102's
  # A/B in one call, for when a single machine is all a session gets: the stages' own times, then the whole model by
  # default and with stage 0 at 4 warps (limits 550 s; the denominator is left out, the A/B shares the machine)
  stage_times
  stage0_warps4_ab
  finish
fi
if [ "$PART" = 103 ]; then
  # for the next session with a GPU (after session 44): the stages' own times (stage_times): which launch shapes
  # shorten a stage, before a whole-model row is spent on it
  stage_times
  finish
fi
if [ "$PART" = 102 ]; then
  # session 44, after PART=101 (stage 2 by 32 the default: 0.876x on an H100): call 2's trace puts stage 0 at
  # ~165 us a launch of 64 programs (8 warps, 255 registers, 112 KB shared: one program an SM, two warps a
  # scheduler, latency-bound).  At 4 warps two of its programs could share an SM (2 x 112 KB < 227 KB): stage 0
  # alone and both stages at 4 warps against the default on one machine, then the ratio's denominator
  stage0_warps4_ab
  if [ "${BOTH:-1}" = 1 ]; then
    step 100 mac-65536x1-wf4096-stages-warps4 env TITANS_TRITON_PASS_WARPS=stage0=4,stage2=4 $WF4 \
      --out "$RES/h_wf4096_stages_warps4.json"
  fi
  mac_4096x8_defaults 130
  finish
fi
if [ "$PART" = 101 ]; then
  # session 44: PART=99 on an H100 (283.3K tokens/s by default, 296.5K with stage 2 by 32 units, 290.3K with both
  # stages so; stage 0 by 64 over the shared memory): stage 2 by 32 is the default now (TITANS_TRITON_STAGE2_BLOCK=
  # auto).  SHARE=a: the GPU test (the fixed one: each case on its own failed shapes), the new default, the old
  # (=0), and stage 2 by 32 at 4 warps (its tiles fit: room for two blocks an SM?); SHARE=b on the warm machine: each
  # again, stage 2 by 64, the denominator and the graphed test of the default layout
  if [ "${SHARE:-a}" = a ]; then
    kernel_tests 120 gpu-test-stage-blocks 'stages_over_blocks_of_hidden_units_on_gpu' gpu_test_stage_blocks.txt
    step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
    step 100 mac-65536x1-wf4096-stage2-whole env TITANS_TRITON_STAGE2_BLOCK=0 $WF4 \
      --out "$RES/h_wf4096_stage2_whole.json"
    step 100 mac-65536x1-wf4096-stage2-warps4 env TITANS_TRITON_PASS_WARPS=stage2=4 $WF4 \
      --out "$RES/h_wf4096_stage2_warps4.json"
  else
    step 100 mac-65536x1-wf4096-defaults-2 $WF4 --out "$RES/h_wf4096_defaults_2.json"
    step 100 mac-65536x1-wf4096-stage2-whole-2 env TITANS_TRITON_STAGE2_BLOCK=0 $WF4 \
      --out "$RES/h_wf4096_stage2_whole_2.json"
    step 100 mac-65536x1-wf4096-stage2-block64 env TITANS_TRITON_STAGE2_BLOCK=64 $WF4 \
      --out "$RES/h_wf4096_stage2_block64.json"
    mac_4096x8_defaults 130
    test_wavefront 90 'graphed and default' gpu_test_graphed_default.txt
  fi
  finish
fi
if [ "$PART" = 100 ]; then
  # session 44, after PART=99 on the same machine: the flat ratio's denominator (MAC 4096 x 8, one pass) by default
  # and with the blocked stages (the same kernels run there: a faster backward moves both sides of the ratio)
  mac_4096x8_defaults 150
  for blk in ${BLOCKS:-32}; do
    step 110 "mac-4096x8-stages-block$blk" env TITANS_TRITON_STAGE0_BLOCK=$blk TITANS_TRITON_STAGE2_BLOCK=$blk \
      $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_stages_block$blk.json"
  done
  finish
fi
if [ "$PART" = 98 ]; then
  # for the next session with a GPU (after session 43: the 65536 x 1 step is bound by the GPU's throughput; ~37% of
  # its SM time estimated held by the memory kernels' whole-SM blocks): one profiled step at 65536 x 1 and at 4096 x 8
  # with each kernel's launch configuration in the trace, then the SM time each phase's kernels held
  # (chain_anatomy.py --phases): what a token costs in SM time in each, and which kernels hold it
  step 200 mac-65536x1-wf4096-configs ${WF4/--iters 3/--iters 1} --profile 30 \
    --out "$RES/h_wf4096_configs.json" --profile-trace "$RES/h_wf4096_configs"
  step 40 phases-65536x1 python3 benchmarks/chain_anatomy.py "$RES/h_wf4096_configs.mac_65536x1.json.gz" --phases \
    --out "$RES/phases_65536x1.json"
  step 160 mac-4096x8-configs $H3 --shapes 4096x8 --warmup 2 --iters 1 --profile 30 \
    --out "$RES/h_4096x8_configs.json" --profile-trace "$RES/h_4096x8_configs"
  step 40 phases-4096x8 python3 benchmarks/chain_anatomy.py "$RES/h_4096x8_configs.mac_4096x8.json.gz" --phases \
    --anchor _memory_bwd3_overlap --forward-anchor _memory_fwd --out "$RES/phases_4096x8.json"
  finish
fi
if [ "$PART" = 97 ]; then
  # session 43: PART=96's profiles put a memory block's backward chain at ~0.6 ms a segment alone on the GPU and
  # ~1.2 ms beside the others: the step is bound by its kernels' neighbours.  The chains on SMs of their own (CUDA
  # green contexts, TITANS_WAVEFRONT_GREEN_SMS; titans/utils/green_contexts.py): first the driver probe (the split, a
  # matmul / inductor kernel on each group's stream, a CUDA graph across both), then the default row and the chains
  # on 64, 48 and 80 SMs (each row's capture is checked against eager by the harness).  Ran in session 43: 20-35%
  # slower at every split (RESULTS.md section 6); the switch and module were removed again, commit ea76371 has them
  step 60 green-probe env TITANS_WAVEFRONT_GREEN_SMS=64 python3 -m titans.utils.green_contexts
  step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  for sms in 64 48 80; do
    step 100 "mac-65536x1-wf4096-green$sms" env TITANS_WAVEFRONT_GREEN_SMS=$sms $WF4 \
      --out "$RES/h_wf4096_green$sms.json"
  done
  finish
fi
if [ "$PART" = 96 ]; then
  # session 43: why 4096-token steps beat 2048 (327.1K against 315.2K tokens/s with the read-outs apart, session 42)
  # although a chain's fill and drain (a memory block waits for the one before it to finish a whole step) halve at
  # 2048: one profiled step of each with today's default (read-outs apart), every stream's kernels kept for the
  # per-call stalls and the chains' lags (analysed off the device with benchmarks/chain_anatomy.py)
  for n in 4096 2048; do
    W="${WF4/--wavefront-step 4096/--wavefront-step $n}"
    step 190 "mac-65536x1-wf$n-timeline" ${W/--iters 3/--iters 1} --profile 30 \
      --out "$RES/h_wf${n}_timeline.json" --profile-trace "$RES/h_wf${n}_timeline"
  done
  finish
fi
if [ "$PART" = 95 ]; then
  # after PART=94 (prepared in session 42): where a 65536 x 1 step's time goes now that MAC's read-outs run apart by
  # default (session 33's anatomy, read-outs on the chain: a segment's backward 1,217 us in 53 kernels on the
  # chain).  One profiled step in 4096-token steps each way, the busiest streams' kernels in order, and each chain's
  # period between its backward walks (--merged: a replayed graph spreads a chain over many streams)
  for layout in apart on-chain; do
    RS=1
    [ $layout = on-chain ] && RS=0
    step 200 "mac-65536x1-wf4096-readouts-$layout-timeline" env TITANS_WAVEFRONT_READOUT_STREAMS=$RS \
      ${WF4/--iters 3/--iters 1} --profile 30 --out "$RES/h_wf4096_readouts_${layout}_timeline.json" \
      --profile-trace "$RES/h_wf4096_readouts_${layout}_timeline"
    step 30 "chain-anatomy-$layout" python3 benchmarks/chain_anatomy.py \
      "$RES/h_wf4096_readouts_${layout}_timeline.mac_65536x1.json.gz" --out "$RES/anatomy_readouts_$layout.json"
    step 20 "chain-period-$layout" python3 benchmarks/chain_anatomy.py \
      "$RES/h_wf4096_readouts_${layout}_timeline.mac_65536x1.json.gz" --merged \
      --out "$RES/period_readouts_$layout.json"
  done
  finish
fi
if [ "$PART" = 94 ]; then
  # for the next session with a GPU (after session 42, whose H200 put MAC's read-outs apart at +4.3% with 32 queues:
  # TITANS_WAVEFRONT_READOUT_STREAMS=auto, on with 32 queues, is the default now).  The flat pair with the new default
  # (each row records the layout it resolved to: defaults.wavefront_readouts_apart), then session 41's layout
  # (read-outs on the chain) on the same machine, the per-token stand-ins with 32 queues and the new default (23%
  # slower with 8, session 36), and the poisoned-buffer test
  step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 130
  step 80 mac-65536x1-wf4096-readouts-on-chain env TITANS_WAVEFRONT_READOUT_STREAMS=0 $WF4 \
    --out "$RES/h_wf4096_readouts_on_chain.json"
  # the new default layout (batched inputs, read-outs apart) captured against eager at the test's size
  test_wavefront 60 'graphed and default' gpu_test_graphed_default.txt
  step 100 mac-65536x1-wf4096-per-token env TITANS_DEFER_PER_TOKEN=1 $WF4 --out "$RES/h_wf4096_per_token.json"
  # last (may be cut: 80 s were too few twice on a fresh machine; give it a call of its own if so)
  kernel_tests 50 gpu-test-poisoned-buffers 'never_read_a_buffer_they_did_not_write_on_gpu' \
    gpu_test_poisoned_buffers.txt
  finish
fi
if [ "$PART" = 93 ]; then
  # for the next session with a GPU (after session 41): the harness now asks for 32 hardware queues before its
  # first torch.cuda.is_available() (session 41: set after it, its wavefront rows ran at the 8-queue rate, 260,960
  # tokens/s against 284,300 with the variable set in the shell).  First the default wavefront row with nothing set
  # in the shell (expect ~284K on an H100), then the flat pair's denominator, then the layouts last timed with 8
  # queues in effect: the batched read-outs (capture verified in session 41) and 8192-token steps
  step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 150
  step 130 mac-65536x1-wf4096-batched-readouts env TITANS_WAVEFRONT_BATCHED_READOUTS=1 $WF4 \
    --out "$RES/h_wf4096_batched_readouts.json"
  step 130 mac-65536x1-wf8192-defaults $WF8 \
    --out "$RES/h_wf8192_defaults.json"
  finish
fi
if [ "$PART" = 92 ]; then
  # session 41, after PART=91 (284,300 tokens/s with the variable set before the process, 260,960 set by the harness
  # after torch.cuda.is_available()): the harness now asks for the queues before that check
  step 150 mac-65536x1-wf4096-defaults-fixed $WF4 --out "$RES/h_wf4096_defaults_fixed.json"
  python3 -c "from titans.utils.tensors import cuda_driver_started as s; import torch; a = s(); \
torch.cuda.is_available(); print('driver started before / after is_available:', a, s())" >> "$LOG" 2>&1
  finish
fi
if [ "$PART" = 91 ]; then
  # session 41: PART=88/89's wavefront rows ran at session 40's 8-queue rates although the harness set
  # CUDA_DEVICE_MAX_CONNECTIONS=32 in the process (too late?): the same row with the variable set before the process
  step 150 mac-65536x1-wf4096-env32 env CUDA_DEVICE_MAX_CONNECTIONS=32 $WF4 --out "$RES/h_wf4096_env32.json"
  finish
fi
if [ "$PART" = 89 ] || [ "$PART" = 90 ]; then
  # session 41, the second call on a warm machine after PART=88.  PART=90 (the graphed tests still failing): first
  # where a captured forward departs (each layout captured as it is, with every tensor held alive, and its eager
  # step under CUDA's sanitizer).  Both: the poisoned-buffer test, 8192-token wavefront steps (2048 -> 4096 gave
  # +2.2% on an H100 with 32 queues: fewer pipeline fills and drains a row), the batched read-outs with 4096-token
  # steps (their capture fixed in session 40), and for PART=89 the read-outs apart with 4096-token steps
  if [ "$PART" = 90 ]; then
    step 200 graphed-wavefront-diff-keep-alive-sanitize python3 benchmarks/graphed_wavefront_diff.py --keep-alive \
      --sanitize --out "$RES/graphed_wavefront_diff.json"
  fi
  step 80 gpu-test-poisoned-buffers sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    -k 'never_read_a_buffer_they_did_not_write_on_gpu' > $RES/gpu_test_poisoned_buffers.txt 2>&1"
  step 150 mac-65536x1-wf8192-defaults $WF8 \
    --out "$RES/h_wf8192_defaults.json"
  step 130 mac-65536x1-wf4096-batched-readouts env TITANS_WAVEFRONT_BATCHED_READOUTS=1 $WF4 \
    --out "$RES/h_wf4096_batched_readouts.json"
  if [ "$PART" = 89 ]; then
    step 140 mac-65536x1-wf4096-readouts env TITANS_WAVEFRONT_READOUT_STREAMS=1 $WF4 \
      --out "$RES/h_wf4096_readouts.json"
  fi
  finish
fi
if [ "$PART" = 88 ]; then
  # session 41's first call: PART=86's graphed tests first (session 40's fix of the split core's capture bug, found
  # on the CPU by benchmarks/stream_hazards.py: all ten layouts should pass now), then PART=85's flat pair on one
  # machine with 32 queues and 4096-token steps, then whether the walks wait on instruction fetches
  step 110 gpu-test-graphed-wavefront sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_wavefront.py \
    -k 'graphed' > $RES/gpu_test_graphed_wavefront.txt 2>&1"
  step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 150
  # the backward walk's loop body is ~60 KB of machine code, the backward stage kernels beside it 120-210 KB of
  # straight-line code each (cross-compiled for sm_90): the walk beside a kernel of 200 KB straight-line
  # arithmetic, then beside the same arithmetic as a ~7 KB loop (memory_contention.py --background-code)
  step 140 memory-contention-code env TITANS_TRITON_BWD=split TITANS_TRITON_WALK_CLOCK=1 python3 \
    benchmarks/memory_contention.py --streams 1 3 --background 0 --background-code 200 --background-reps 120 \
    --out "$RES/memory_contention_code.json"
  finish
fi
if [ "$PART" = 87 ]; then
  # after PART=85 / 86 (prepared in session 40): with 32 queues, the per-token stand-ins (TITANS_DEFER_PER_TOKEN=1:
  # 23% slower on an H200 in session 36 with 8 queues, cause not found - their sums run on the weight-gradient
  # streams, which shared queues with the chains) and the batched read-outs apart (2048-token steps)
  step 170 mac-65536x1-wf4096-per-token env TITANS_DEFER_PER_TOKEN=1 $WF4 --out "$RES/h_wf4096_per_token.json"
  step 130 mac-65536x1-wf2048-batched-readouts-apart env TITANS_WAVEFRONT_READOUT_STREAMS=1 \
    TITANS_WAVEFRONT_BATCHED_READOUTS=1 $WF --out "$RES/h_wf2048_batched_readouts_apart.json"
  step 110 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 150
  finish
fi
if [ "$PART" = 86 ]; then
  # for a session with a GPU (after session 40, after PART=85): the split core's capture bug.  Session 40's PART=84
  # on an H100: every layout through the split core failed graphed_loss's test (4.176023 vs 4.176198), the PyTorch
  # memory and the read-outs apart a segment at a time too - not the Triton kernels.  Later that session
  # benchmarks/stream_hazards.py found on the CPU the fresh state freed mid-call without record_stream (fixed), so
  # first the graphed tests (all ten layouts should pass now), then where a captured forward first departs, each
  # layout captured as it is and with every tensor of the capture held alive (no block of the pool reused), and each
  # layout's eager step under PyTorch's CUDA sanitizer (two streams on one tensor without a synchronisation)
  step 100 gpu-test-graphed-wavefront sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_wavefront.py \
    -k 'graphed' > $RES/gpu_test_graphed_wavefront.txt 2>&1"
  step 240 graphed-wavefront-diff-keep-alive-sanitize python3 benchmarks/graphed_wavefront_diff.py --keep-alive \
    --sanitize --out "$RES/graphed_wavefront_diff.json"
  step 80 gpu-test-poisoned-buffers sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    -k 'never_read_a_buffer_they_did_not_write_on_gpu' > $RES/gpu_test_poisoned_buffers.txt 2>&1"
  finish
fi
if [ "$PART" = 85 ]; then
  # for the next session with a GPU (after session 40): the harness now sets CUDA_DEVICE_MAX_CONNECTIONS=32 itself
  # for --wavefront rows (titans.utils.tensors.widen_hardware_queues; session 40 on an H100: 4096-token steps 284.5K
  # with 32 queues against 260.5K with 8, the default 2048-token row 276.4K / 278.4K).  The flat pair on one machine
  # with the new defaults and 4096-token steps, then the read-outs apart (285.3K / 284.9K on the H100), then
  # the batched read-outs (+1.4% on an H200 in session 37, but their capture computed another loss: the fresh state
  # freed mid-call without record_stream, fixed later in session 40 - each row's capture_check says whether it holds)
  step 170 mac-65536x1-wf4096-defaults $WF4 --out "$RES/h_wf4096_defaults.json"
  mac_4096x8_defaults 150
  step 110 mac-65536x1-wf2048-readouts env TITANS_WAVEFRONT_READOUT_STREAMS=1 $WF \
    --out "$RES/h_wf2048_readouts.json"
  step 110 mac-65536x1-wf4096-batched-readouts env TITANS_WAVEFRONT_BATCHED_READOUTS=1 $WF4 \
    --out "$RES/h_wf4096_batched_readouts.json"
  finish
fi
if [ "$PART" = 84 ]; then
  # session 40, the last of the session's device time on the same H100: PART=78's graphed tests (the batched
  # read-outs' capture bug, three new layouts) and PART=79's poisoned-buffer GPU test
  step 100 gpu-test-graphed-wavefront sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_wavefront.py \
    tests/test_fused_memory.py tests/test_static_decode.py -k 'graphed or captured or graph_replay' \
    > $RES/gpu_test_graphed_wavefront.txt 2>&1"
  step 80 gpu-test-poisoned-buffers sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    -k 'never_read_a_buffer_they_did_not_write_on_gpu' > $RES/gpu_test_poisoned_buffers.txt 2>&1"
  finish
fi
if [ "$PART" = 83 ]; then
  # session 40: PART=82 (the same H100, 32 queues): 4096-token steps 284,500 by default, 282,461 with the read-outs
  # apart.  The same machine: 4096-token steps with 8 queues, and 4096 x 8 with 32 queues (the ratio's denominator
  # if 32 became the default)
  step 90 mac-65536x1-wf4096-connections8 $WF4 \
    --out "$RES/h_wf4096_connections8.json"
  step 100 mac-4096x8-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 $H3 --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_mac_4096x8_connections32.json"
  finish
fi
if [ "$PART" = 82 ]; then
  # session 40: PART=81 (the same H100): the read-outs apart 243,029 tokens/s with 8 queues, 284,923 with 32 (the
  # default 277,671): the queues were session 33's loss.  The same machine: with 32 queues, 4096-token wavefront
  # steps (8 segments a call) for the read-outs apart and the default, then the read-outs apart with programmatic
  # dependent launch
  RO="TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1"
  C32="CUDA_DEVICE_MAX_CONNECTIONS=32"
  step 110 mac-65536x1-wf4096-readouts-connections32 env $C32 $RO $WF4 \
    --out "$RES/h_wf4096_readouts_connections32.json"
  step 100 mac-65536x1-wf4096-connections32 env $C32 $WF4 \
    --out "$RES/h_wf4096_connections32.json"
  step 110 mac-65536x1-wf2048-readouts-connections32-pdl env $C32 $RO TITANS_INDUCTOR_OPTIONS='{"triton.enable_pdl": true}' \
    $WF --out "$RES/h_wf2048_readouts_connections32_pdl.json"
  finish
fi
if [ "$PART" = 81 ]; then
  # session 40: PART=80 on an H100 put the read-outs apart with 32 queues at 285,327 tokens/s against 278,355 by
  # default (8 queues; 276,397 with 32): faster, where session 33 (H200, 8 queues) had them 18% slower.  The same
  # machine if still held: the read-outs apart with 8 queues (is it the queues?), again with 32, with 32 and urgent
  # read-out streams, and the default again (the noise)
  RO="TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1"
  step 130 mac-65536x1-wf2048-readouts-connections8 env $RO $WF --out "$RES/h_wf2048_readouts_connections8.json"
  step 100 mac-65536x1-wf2048-readouts-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 $RO $WF \
    --out "$RES/h_wf2048_readouts_connections32.json"
  step 100 mac-65536x1-wf2048-readouts-urgent-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 \
    TITANS_WAVEFRONT_READOUT_URGENT=1 $RO $WF --out "$RES/h_wf2048_readouts_urgent_connections32.json"
  mac_65536x1_defaults 100
  mac_4096x8_defaults 100
  finish
fi
if [ "$PART" = 80 ]; then
  # session 40 (first GPU call of the session if one comes; PART=78 / 79 after it): the flat pair with session 37's
  # defaults on one machine, and the hardware work queues. Since session 37 a memory block's work spans four streams
  # (its chain, feed-forward, batched inputs, deferred weight gradients: 12 for the three blocks) and the replayed
  # graph spreads them over hundreds of driver streams, all multiplexed onto CUDA_DEVICE_MAX_CONNECTIONS hardware
  # queues (8 by default): a chain that shares a queue with other work waits behind it (session 29: 32 queues no gain,
  # with fewer streams). Then session 33's read-outs apart (-17% by their dependencies alone, emulated; +18% measured
  # with 8 queues) with 32 queues (PART=70's last row, never run)
  mac_65536x1_defaults 170
  step 90 mac-65536x1-wf2048-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 $WF \
    --out "$RES/h_wf2048_connections32.json"
  mac_4096x8_defaults 150
  step 140 mac-65536x1-wf2048-readouts-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 \
    TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1 $WF --out "$RES/h_wf2048_readouts_connections32.json"
  finish
fi
if [ "$PART" = 79 ]; then
  # session 39 (no GPU lent; for after PART=78): the 14 matmuls on a memory block's backward chain (session 33's
  # anatomy: 101 us + 41 us of gaps a segment, cuBLAS kernels of 5-11 us for batch-1 projections) and the ~25
  # inductor kernels around them: inductor's Triton matmul templates, autotuned against cuBLAS at compile time with
  # their elementwise neighbours fused into them (max_autotune_gemm, never tried here), against the defaults on the
  # same machine; then the two measured opt-ins together (programmatic dependent launch +1.1% over four pairs,
  # coordinate descent tuning +2.5% once; their joint row was cut while compiling in session 33's PART=68), with the
  # matmul templates, last (may be cut).  First (session 39): the memory's kernel paths with every empty buffer
  # filled with NaN against the plain run, bit for bit, on the GPU's own kernels (the walks over parts, not their
  # interpreter twins) and the wavefront on its streams: a read of memory nobody wrote would explain the batched
  # read-outs' other loss under CUDA graphs (the capture's fresh pool) - on the CPU there is none
  step 80 gpu-test-poisoned-buffers sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    -k 'never_read_a_buffer_they_did_not_write_on_gpu' > $RES/gpu_test_poisoned_buffers.txt 2>&1"
  mac_65536x1_defaults 150
  step 250 mac-65536x1-wf2048-max-autotune-gemm env TITANS_INDUCTOR_OPTIONS='{"max_autotune_gemm": true}' $WF \
    --out "$RES/h_wf2048_max_autotune_gemm.json"
  step 110 mac-65536x1-wf2048-max-autotune-gemm-optins env \
    TITANS_INDUCTOR_OPTIONS='{"max_autotune_gemm": true, "triton.enable_pdl": true, "coordinate_descent_tuning": true}' \
    $WF --out "$RES/h_wf2048_max_autotune_gemm_optins.json"
  finish
fi
if [ "$PART" = 78 ]; then
  # for the next session with a GPU (session 38 had none): PART=77's graphed test, now with three more layouts that
  # tell the batched read-outs' capture bug apart (the PyTorch split core; the walks in one program a head; the
  # read-outs apart, the split core a segment at a time) and graphed_loss's own capture check asserted too, then the
  # flat pair with session 37's defaults (the batched segment inputs) on one machine (each harness row records the
  # capture check, session 38: the captured loss against the eager one at full size, bf16), then the wavefront's
  # CUDA tests
  # (session 38 added the op alone: three segments' split walks and their read-outs, stacked or one by one, Triton
  # and PyTorch, captured by make_graphed_callables against eager, tests/test_fused_memory.py -k captured; and the
  # decoder's replay test, which now asserts GraphedDecoder's own capture check)
  step 100 gpu-test-graphed-wavefront sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_wavefront.py \
    tests/test_fused_memory.py tests/test_static_decode.py -k 'graphed or captured or graph_replay' \
    > $RES/gpu_test_graphed_wavefront.txt 2>&1"
  # where a captured forward first departs from the eager one, layout by layout (token, segment, call; session 38
  # added two layouts on the caller's stream alone)
  step 80 graphed-wavefront-diff python3 benchmarks/graphed_wavefront_diff.py --out "$RES/graphed_wavefront_diff.json"
  mac_65536x1_defaults 170
  mac_4096x8_defaults 160
  test_wavefront 60
  # last (may be cut): 4096-token wavefront steps, 8 segments a call - the batched inputs made for twice the segments
  # at once, against longer offsets between the blocks' chains (session 21 chose 2048 without batched inputs)
  step 100 mac-65536x1-wf4096 $H3 --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 4096 \
    --out "$RES/h_wf4096_defaults.json"
  finish
fi
if [ "$PART" = 77 ]; then
  # session 37, third call: PART=76's graphed wavefront test with the batched inputs and read-outs failed again, now
  # against the same wavefront run eagerly (4.17602 vs 4.17620; the eager wavefront equals the one pass on the GPU):
  # which of the batched parts (or three segments a call alone) the captured graphs get wrong
  step 120 gpu-test-graphed-wavefront sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_wavefront.py \
    -k graphed > $RES/gpu_test_graphed_wavefront.txt 2>&1"
  finish
fi
if [ "$PART" = 76 ]; then
  # session 37, second call: PART=75 timed the batched segment inputs and read-outs at 305.3K tokens/s against the
  # default's 288.8K (+5.7%, one machine; its 4096 x 8 row ran out of its 100 s), so they are the wavefront's
  # defaults now, with the inner forward saved by the walk alone (TITANS_TRITON_SAVE_INNER=auto): the flat pair with
  # the new defaults; the wavefront's CUDA tests (the graphed one with the batched defaults failed in PART=75 against
  # the one pass, by 4e-5 relative in float32, now against the same wavefront eagerly); the float32 distance to the
  # one pass with Triton's TF32 dots and with ieee ones (benchmarks/wavefront_float32.py).  As it ran: its 65536 x 1
  # row was cut at 130 s compiling; the batched read-outs are opt-in again since, and PART=78 times the new defaults
  mac_65536x1_defaults 130
  mac_4096x8_defaults 160
  test_wavefront 60
  step 40 wavefront-float32-tf32 python3 benchmarks/wavefront_float32.py --out "$RES/wavefront_float32_tf32.json"
  step 40 wavefront-float32-ieee env TRITON_F32_DEFAULT=ieee python3 benchmarks/wavefront_float32.py \
    --out "$RES/wavefront_float32_ieee.json"
  finish
fi
if [ "$PART" = 75 ]; then
  # session 36, second call: PART=72 found the per-token stand-ins 23% slower (224.8K vs 292.6K tokens/s at 65536 x 1),
  # so the per-segment sums are the default again; the batched read-outs (+4% over the per-token default there) and
  # the batched queries, alone and together, against the default on one machine, and the 4096 x 8 denominator.
  # Session 37: the batched queries now take attention's projections of the segment input too (SegmentInputs); the
  # wavefront's CUDA tests (streams) after the rows; the first row compiles cold (119 s of 120 in PART=72); with the
  # input norm and the batched inputs on a stream of their own (TITANS_WAVEFRONT_INPUTS_STREAM, default 1) and,
  # last (may be cut), on the chain's stream
  mac_65536x1_defaults 130
  step 110 mac-65536x1-wf2048-batched-queries-readouts env TITANS_WAVEFRONT_BATCHED_QUERIES=1 \
    TITANS_WAVEFRONT_BATCHED_READOUTS=1 TITANS_TRITON_SAVE_INNER=1 $WF --out "$RES/h_wf2048_batched_both.json"
  step 110 mac-65536x1-wf2048-batched-queries env TITANS_WAVEFRONT_BATCHED_QUERIES=1 \
    $WF --out "$RES/h_wf2048_batched_queries.json"
  mac_4096x8_defaults 100
  test_wavefront 60
  step 90 mac-65536x1-wf2048-batched-both-one-stream env TITANS_WAVEFRONT_BATCHED_QUERIES=1 \
    TITANS_WAVEFRONT_INPUTS_STREAM=0 TITANS_WAVEFRONT_BATCHED_READOUTS=1 TITANS_TRITON_SAVE_INNER=1 $WF \
    --out "$RES/h_wf2048_batched_both_one_stream.json"
  finish
fi
if [ "$PART" = 74 ]; then
  # session 36 (for after PART=72): the retrievals' inputs made once a wavefront call, before its segment chains
  # (TITANS_WAVEFRONT_BATCHED_QUERIES=1: the query rows of W_QKV, the read convolution, SiLU, l2 norm and the output
  # gate's projection for the call's four segments at once; a later segment's step graphs lose 49 of 330 forward and
  # 64 of 351 backward ops on this CPU), alone and with the batched read-outs (inner forward saved), against the
  # default on the same machine, and the 4096 x 8 denominator
  test_wavefront 50
  mac_65536x1_defaults 120
  step 110 mac-65536x1-wf2048-batched-queries env TITANS_WAVEFRONT_BATCHED_QUERIES=1 \
    $WF --out "$RES/h_wf2048_batched_queries.json"
  step 110 mac-65536x1-wf2048-batched-queries-readouts env TITANS_WAVEFRONT_BATCHED_QUERIES=1 \
    TITANS_WAVEFRONT_BATCHED_READOUTS=1 TITANS_TRITON_SAVE_INNER=1 $WF --out "$RES/h_wf2048_batched_both.json"
  mac_4096x8_defaults 100
  finish
fi
if [ "$PART" = 73 ]; then
  # session 35 (for after PART=72): the batched read-outs on a timeline, cut into the chain's segment steps (against
  # PART=71's default anatomy: 53 kernels, 1,217 us a segment in session 33), and batched on the read-out stream
  # (TITANS_WAVEFRONT_READOUT_STREAMS=1 as well: a call's read-outs at once, off the chain); last, the batched
  # read-outs with the walk recomputing the inner forward (moved here from PART=72 in session 36)
  step 170 mac-65536x1-wf2048-batched-readouts-timeline env TITANS_WAVEFRONT_BATCHED_READOUTS=1 \
    TITANS_TRITON_SAVE_INNER=1 $H3 --wavefront --shapes 65536x1 --warmup 1 --iters 1 --wavefront-step 2048 \
    --profile 30 --out "$RES/h_wf2048_batched_readouts_timeline.json" \
    --profile-trace "$RES/h_wf2048_batched_readouts_timeline"
  step 30 chain-anatomy-batched python3 benchmarks/chain_anatomy.py \
    "$RES/h_wf2048_batched_readouts_timeline.mac_65536x1.json.gz" --out "$RES/anatomy_batched.json"
  step 120 mac-65536x1-wf2048-batched-readouts-apart env TITANS_WAVEFRONT_BATCHED_READOUTS=1 \
    TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1 $WF --out "$RES/h_wf2048_batched_readouts_apart.json"
  mac_65536x1_defaults 120
  step 90 mac-65536x1-wf2048-batched-readouts-recompute env TITANS_WAVEFRONT_BATCHED_READOUTS=1 \
    $WF --out "$RES/h_wf2048_batched_readouts_recompute.json"
  finish
fi
if [ "$PART" = 72 ]; then
  # session 35 (its call got no machine; the next session's first call): sessions 34-35's launches off the chains
  # (PART=71's changes, now with the convolution caches' gradients uncopied) and the batched read-outs
  # (TITANS_WAVEFRONT_BATCHED_READOUTS=1: a wavefront call's four segment chains first, then their read-outs at once,
  # stacked on the batch: the read-out kernels and the memory's read-out stage 0 launched once a call instead of once
  # a segment, on the chain's own stream; with the walk over parts reading the saved inner forward, as session 33's
  # read-outs apart, and without).  GPU tests first, then the flat-scaling rows on one machine.  Session 36 (no GPU
  # lent either): the elementwise parameters' stand-ins broadcast over the segment's tokens, so a segment's backward
  # no longer reduces their gradients over its tokens (15 sums over the tokens gone from a later segment's compiled
  # backward graph, CPU count; session 33's chain had 6 looped reduction kernels, 76 us a segment, which of them
  # these were is not known): in every row here but the last, which reduces them per segment again
  # (TITANS_DEFER_PER_TOKEN=0, sessions 26-35)
  step 120 gpu-test-session35 sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    tests/test_models.py tests/test_weight_grads.py -k 'strided_dy or stacked or on_gpu or residual_streams or \
    without_a_copy' > $RES/gpu_test_session35.txt 2>&1"
  test_wavefront 50
  mac_65536x1_defaults 120
  step 110 mac-65536x1-wf2048-batched-readouts env TITANS_WAVEFRONT_BATCHED_READOUTS=1 TITANS_TRITON_SAVE_INNER=1 \
    $WF --out "$RES/h_wf2048_batched_readouts.json"
  mac_4096x8_defaults 100
  step 90 mac-65536x1-wf2048-per-segment-sums env TITANS_DEFER_PER_TOKEN=0 \
    $WF --out "$RES/h_wf2048_per_segment_sums.json"
  finish
fi
if [ "$PART" = 71 ]; then
  # session 34 (CPU only, no GPU lent): launches gone from the memory blocks' streams each segment, found on the
  # CPU (benchmarks/eager_glue.py; TRITON_INTERPRET): the memory backward reads dy through its strides (it was copied
  # to a dense float32 buffer before stage 0), the segments' outputs come widened to the residual stream's float32
  # (the eager sum's backward cast the gradient to bf16), and their gradient slices come with dense strides at batch 1
  # (AOTAutograd copied each, strides differing from the traced ones); the persistent prefix's gradients are summed
  # once a call on the weight-gradient stream (were added segment by segment); the deferred projections' weights are
  # cast once a step (were once a call).  Their GPU tests, both rows on one machine, then the chain's anatomy
  # (session 33: 53 kernels, 1,217 us a segment).  Session 35 (its call got no machine): the convolution caches'
  # gradients reach the next segment's backward with the traced strides too (two copies a segment fewer at batch 1),
  # in the same rows
  step 120 gpu-test-session34 sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
    tests/test_models.py tests/test_weight_grads.py -k 'strided_dy or on_gpu or residual_streams or without_a_copy' \
    > $RES/gpu_test_session34.txt 2>&1"
  test_wavefront 50
  mac_65536x1_defaults 120
  mac_4096x8_defaults 100
  mac_65536x1_timeline 170
  finish
fi
if [ "$PART" = 70 ]; then
  # session 33 (for the next session): PART=67's read-outs apart were 18% slower, each chain's segment step ~1.6 ms
  # against 1.22 while its read-out stream idled; benchmarks/stream_hand_offs.py (CPU) shows no gradient from a chain
  # to its read-out stream, and its --emulate puts the split step 17-19% shorter by its dependencies alone.  With one
  # memory block (layer 4) no other chain can hold it: the default and the read-outs apart (inner forward saved),
  # each on a timeline whose walks give the chain's period (chain_anatomy.py --merged: one chain in the step, however
  # the replayed graph spread it).  Faster apart here -> the wait comes from another block
  W1="${WF/--memory-layers 2 4 6/--memory-layers 4}"
  W1T="${W1/--iters 3/--iters 1} --profile 30"
  for layout in defaults readouts; do
    RO=""
    [ $layout = readouts ] && RO="TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1"
    step 140 "mac1-65536x1-wf2048-$layout-timeline" env $RO $W1T --out "$RES/h_mac1_wf2048_${layout}_timeline.json" \
      --profile-trace "$RES/h_mac1_wf2048_${layout}_timeline"
    step 20 "chain-period-mac1-$layout" python3 benchmarks/chain_anatomy.py \
      "$RES/h_mac1_wf2048_${layout}_timeline.mac_65536x1.json.gz" --merged --out "$RES/period_mac1_$layout.json"
  done
  # a stream mapped to a hardware work queue that another stream's work holds would trail it: the three-block row with
  # 32 queues (CUDA's default 8; session 29: no change to the default layout)
  step 120 mac-65536x1-wf2048-readouts-connections32 env CUDA_DEVICE_MAX_CONNECTIONS=32 \
    TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1 $WF --out "$RES/h_wf2048_readouts_connections32.json"
  finish
fi
if [ "$PART" = 69 ]; then
  # session 33: PART=68: the wavefront's CUDA tests pass (50, the urgent read-outs among them); the opt-ins row was cut
  # at 260 s while compiling with coordinate descent tuning (a fresh machine).  Is the read-out streams' loss (-18%,
  # PART=67) the CUDA graph's or the streams' own?  Both layouts without CUDA graphs (compiled blocks; launch-bound,
  # so only their ratio counts)
  HW="$HP --wavefront --shapes 65536x1 --warmup 2 --iters 3 --wavefront-step 2048"
  step 150 mac-65536x1-wf2048-nographs $HW --out "$RES/h_wf2048_nographs.json"
  step 120 mac-65536x1-wf2048-readouts-nographs env TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1 \
    $HW --out "$RES/h_wf2048_readouts_nographs.json"
  finish
fi
if [ "$PART" = 68 ]; then
  # session 33: PART=67 (one machine): the read-out streams with the inner forward saved 242,255 tokens/s on the
  # feed-forward's stream, 242,131 on urgent streams of their own (-18% against PART=66's 294,981 by default): less
  # kernel time (649 vs 783 ms a step) at lower concurrency (2.3 vs 3.4); the step's graph ran on 986 streams, so no
  # stream held a chain (the anatomy found no period).  The wavefront's CUDA tests (the urgent read-outs new), then
  # MAC 65536 x 1 with every measured opt-in on top of the new defaults: programmatic dependent launch and coordinate
  # descent tuning
  test_wavefront 120
  step 260 mac-65536x1-wf2048-optins env \
    TITANS_INDUCTOR_OPTIONS='{"triton.enable_pdl": true, "coordinate_descent_tuning": true}' $WF \
    --out "$RES/h_wf2048_optins.json"
  finish
fi
if [ "$PART" = 67 ]; then
  # session 33: PART=66 (one machine): MAC 65536 x 1 294,981 tokens/s by default (the cheap regions kept), 294,746
  # with aggressive fusion (no gain); the chain's anatomy: a segment's backward 1,217 us = 1,064 of 53 kernels + 154
  # of gaps, of which the walk 341, stage 0 153 (and ~10 kernels of the output's backward before it: ~90 us) need
  # only the segment's output gradient, not the chain's.  The read-out streams (stage 0 and the output off the chain)
  # were 13-28% slower in sessions 23-31, never seen on a timeline: both placements (the feed-forward's stream; a
  # stream of their own at the chains' priority), the inner forward saved (so the split walk runs over parts)
  RO="TITANS_WAVEFRONT_READOUT_STREAMS=1 TITANS_TRITON_SAVE_INNER=1"
  for where in ffn urgent; do
    [ $where = urgent ] && RO="$RO TITANS_WAVEFRONT_READOUT_URGENT=1"
    step 150 "mac-65536x1-wf2048-readouts-$where-timeline" env $RO $H3 --wavefront --shapes 65536x1 --warmup 1 \
      --iters 1 --wavefront-step 2048 --profile 30 --out "$RES/h_wf2048_readouts_${where}_timeline.json" \
      --profile-trace "$RES/h_wf2048_readouts_${where}_timeline"
    step 20 "chain-anatomy-$where" python3 benchmarks/chain_anatomy.py \
      "$RES/h_wf2048_readouts_${where}_timeline.mac_65536x1.json.gz" --out "$RES/anatomy_readouts_$where.json"
  done
  finish
fi
if [ "$PART" = 66 ]; then
  # session 33: PART=63 (one machine): keeping the memory's cheap regions (TITANS_RECOMPUTE_CHEAP=0) was faster at
  # both shapes (65536 x 1 298.4K vs 292.1K, 4096 x 8 382.7K vs 377.5K; 21.7 / 9.2 GB): the default now.  Where a
  # segment's backward on a memory block's chain spends its time, kernel by kernel (session 29: ~70 small kernels and
  # their gaps were ~44% of its ~1.3 ms), then inductor's aggressive fusion (fuses nodes that share no reads: fewer
  # kernels?) against the defaults on the same machine
  mac_65536x1_timeline 200
  mac_65536x1_defaults 100
  step 120 mac-65536x1-wf2048-aggressive env TITANS_INDUCTOR_OPTIONS='{"aggressive_fusion": true}' $WF \
    --out "$RES/h_wf2048_aggressive.json"
  finish
fi
if [ "$PART" = 65 ]; then
  # session 32 (for a later call): the 65536 x 1 timeline with today's defaults (PART=59's was cut at 130 s while
  # compiling), each busy stream's kernels by name: what the ~70 small kernels a segment on each memory block's
  # backward chain are now; then the default paths' GPU kernel tests (PART=60 passed them in 250 s with room to spare
  # only for those five)
  mac_65536x1_timeline 240
  kernel_tests 300 kernel-tests-gpu-defaults 'kernels_on_gpu or (walks_over_parts_on_gpu and 0-)' \
    gpu_test_fused_memory_defaults.txt
  finish
fi
if [ "$PART" = 62 ]; then
  # session 32: PART=61 (one machine): the eight other GPU tests of the memory kernels pass (coefficients, sync modes,
  # walk clock, walks with the saved inner forward), so every GPU test but the refused 4 parts passed with the fused
  # coefficients as the default.  A fourth same-machine pair for programmatic dependent launch at MAC 65536 x 1
  # (+2.3%, +0.7%, +1.6% in sessions 30-31), the evidence for making it the default on Hopper
  PDL='{"triton.enable_pdl": true}'
  mac_65536x1_defaults 130
  step 100 mac-65536x1-wf2048-pdl env TITANS_INDUCTOR_OPTIONS="$PDL" TITANS_TRITON_BWD=split $WF \
    --out "$RES/h_wf2048_pdl.json"
  finish
fi
if [ "$PART" = 61 ]; then
  # session 32: PART=60 (one machine): the first 5 GPU tests of the memory kernels passed in 250 s (the three backward
  # modes and the walks over 1 and 2 parts without the saved inner forward: every default path, now through the
  # fused coefficients), then the limit; 4096 x 8 376,989 tokens/s; 65536 x 1 cut at 100 s (compiling).  The other
  # eight, verbose with their durations and a stack dump of any test still running after 100 s (a hang would show
  # where it waits)
  VERBOSE="-v --durations=0 -o faulthandler_timeout=100"
  kernel_tests 60 gpu-test-coefficients 'chunk_coefficients_on_gpu' gpu_test_coefficients.txt $VERBOSE
  kernel_tests 180 gpu-test-walk-sync-clock 'meet_through_every_sync_mode or walk_clock' gpu_test_walk_sync_clock.txt \
    $VERBOSE
  kernel_tests 200 gpu-test-parts-inner 'walks_over_parts_on_gpu and not 0-' gpu_test_parts_inner.txt $VERBOSE
  finish
fi
if [ "$PART" = 60 ]; then
  # session 32: PART=59 (one machine): the whole tests/test_fused_memory.py was cut at 120 s after 25 passing tests (the
  # float64 and interpreter-style tests compile for CUDA first), the timeline at 130 s and 4096 x 8 at 110 s (a fresh
  # machine's first compiles); MAC 65536 x 1 287,585 tokens/s by default.  Every GPU test of the memory kernels but the
  # walks over 4 parts (refused by the launcher since session 30's compiler bug) with room (sessions 22-25: 210-230 s),
  # then the flat pair on the same machine
  kernel_tests 250 kernel-tests-gpu 'on_gpu and not four_parts' gpu_test_fused_memory_on_gpu.txt
  mac_4096x8_defaults 150
  mac_65536x1_defaults 100
  finish
fi
if [ "$PART" = 6 ]; then
  # MAG at both shapes (PART=5's limits add up to 460 s; these would not fit beside them)
  H6="${HP/--models mac/--models mag} --cuda-graphs"
  step 150 mag-4096x8 $H6 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mag_4096x8.json"
  step 150 mag-65536x1 $H6 --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mag_65536x1.json"
  finish
fi
if [ "$PART" = 4 ]; then
  # session 18: the memory's q/k/v convolution as a fused sum of shifted products under torch.compile (CUDA's generic
  # depthwise conv kernels were 6% of the compiled step in PART=3's profile); MAC 4096 x 8 as in PART=3 (351,589
  # tokens/s there, with conv1d; its losses 5.649 -> 5.365 to compare: the fused form's exactness is checked on the CPU,
  # compile_check.py)
  step 110 mac-4096x8-shifted-conv $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_shifted_conv.json"
  finish
fi
if [ "$PART" = 3 ]; then
  # MAC's memory blocks compile one segment's step (session 17; run in session 18: the whole block unrolled its
  # segment loop, and 65536 x 1 did not compile in 330 s): both shapes, blocks compiled + CUDA graphs, one process
  # each, the GPU test of compiled + graphed == eager, and a profile of the compiled step
  # first the one-launch backward again: after session 17's timing its stage 2 was found to wait on the walk only
  # (not on its chunk's stage 0, whose scratch it reads and whose dk / dv it adds to); fixed, checked here
  step 70 memory-kernels-overlap python3 benchmarks/memory_kernels.py --backends triton --parts \
    --shapes 8x8x512x64x128x64x2 1x8x512x64x128x64x2 --out "$RES/memory_kernels_overlap.json"
  step 120 mac-4096x8-segment-compile $H3 --shapes 4096x8 --warmup 2 --iters 5 --out "$RES/h_mac_4096x8_segc.json"
  # the issue's baseline in the same call: the FlashAttention Transformer, eager with CUDA graphs (session 14:
  # 647,246 tokens/s; MAC's 0.508x of session 17 is against that older row)
  step 45 transformer-4096x8-eager-graphs python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 \
    --no-prefill --cuda-graphs --models transformer --shapes 4096x8 --warmup 2 --iters 5 \
    --out "$RES/h_transformer_4096x8.json"
  step 150 mac-65536x1-segment-compile $H3 --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_segc.json"
  # compiled + graphed == eager on CUDA (MAC, MAG), with the segment regions
  step 100 gpu-test-compiled-blocks sh -c "python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/test_activation_checkpointing.py -k 'compiled_blocks' > $RES/gpu_test_compiled_blocks.txt 2>&1"
  # where the compiled step's time goes (no CUDA graphs, so the profiler sees each kernel; inductor's cache is warm
  # from the 4096 x 8 row above): MAC spends ~59 of its ~100 ms a step outside the memory kernels, the compiled
  # Transformer ~33 ms in all
  step 90 mac-4096x8-profile $HP --shapes 4096x8 --warmup 2 --iters 2 --profile 40 \
    --out "$RES/h_mac_4096x8_profile.json"
  # (if time is left in a later call: the 4096 x 8 row with MAC's memory blocks compiled whole, the A/B of the
  #  compile scopes: env TITANS_COMPILE_MAC_SEGMENTS=0 $H3 --shapes 4096x8; sessions 15-17's scope: 328,568 tokens/s)
  finish
fi
if [ "$PART" = 2 ]; then
  # flat scaling compiled: MAC 65536 x 1, blocks compiled + CUDA graphs (compile alone took ~135 s in session 15;
  # session 16's 140 s step and session 17's first call ran out of time) (not "CC": Triton's launcher build reads
  # that name as the C compiler)
  step 330 mac-65536x1-compile-graphs env TITANS_TRITON_BWD=$BWD python3 benchmarks/harness.py --dim 512 --depth 8 \
    --heads 8 --window 512 --memory-layers 2 4 6 --memory-chunk 64 --no-prefill --compile --compile-scope blocks \
    --cuda-graphs --models mac --shapes 65536x1 --warmup 2 --iters 3 --out "$RES/h_mac_65536x1_$BWD.json"
  finish
fi

# Session 17: the three backward stages in one launch (TITANS_TRITON_BWD=overlap) against three launches ("split",
# the default; checked against the PyTorch core on the H200 in session 17's first call: worst relative error 0.0073
# at 8x8x512 and 0.0038 at 8x8x4096, every output and gradient).
# 1. the overlapped backward against the PyTorch core (the script fails beyond bf16 tolerance) and timed by pass, at
#    MAC's segment at batch 8 and at batch 1 (the flat-scaling case: 8 walks) and at 4096 tokens; split at batch 1
step 110 memory-kernels-overlap env TITANS_TRITON_BWD=overlap python3 benchmarks/memory_kernels.py --backends triton \
  --parts --shapes 8x8x512x64x128x64x2 1x8x512x64x128x64x2 8x8x4096x64x128x64x2 --out "$RES/memory_kernels_overlap.json"
step 45 memory-kernels-split-b1 env TITANS_TRITON_BWD=split python3 benchmarks/memory_kernels.py --backends triton \
  --parts --shapes 1x8x512x64x128x64x2 --out "$RES/memory_kernels_split_b1.json"
# 2. MAC training at the issue's shape, blocks compiled + CUDA graphs, overlapped then split (the second compile
#    finds inductor's cache warm: the memory kernels are an opaque custom op, the compiled graph is the same)
HARNESS="python3 benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 \
  --memory-chunk 64 --no-prefill --compile --compile-scope blocks --cuda-graphs --models mac --shapes 4096x8 \
  --warmup 2 --iters 5"
step 170 mac-4096x8-overlap env TITANS_TRITON_BWD=overlap $HARNESS --out "$RES/h_mac_4096x8_overlap.json"
step 120 mac-4096x8-split env TITANS_TRITON_BWD=split $HARNESS --out "$RES/h_mac_4096x8_split.json"
# 3. the GPU test of the overlapped kernel (the test's own shape compiles anew: in call 1, 90 s covered one of three)
step 90 kernel-test-overlap sh -c "python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fused_memory.py \
  -k 'on_gpu and overlap' > $RES/kernel_test_overlap.txt 2>&1"
# (later: MAC 65536 x 1 compiled + graphed needs > 140 s (compile ~135 s); compile_check.py --device cuda for MAG /
#  MAL / LMM; the autotuner's gain)

finish
