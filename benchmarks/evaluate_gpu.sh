#!/usr/bin/env bash
# Long-context evaluations of kept checkpoints on one GPU (`titans evaluate --task ...`), several streams of them side
# by side under CUDA MPS: a MAC evaluation is latency-bound (one 64-token segment after another) and leaves the GPU
# mostly idle, so the other variants' evaluations run next to it instead of after it.  Everything under $OUT.
#
#   PLAN: a file, one evaluation a line:  STREAM NAME CHECKPOINT TASKS LENGTHS SAMPLES SEEDS
#     STREAM      lines with the same stream run one after another; streams run at once
#     TASKS       comma-separated task names (babilong_qa2,babilong_qa6)   LENGTHS  comma-separated token counts
#     SEEDS       comma-separated example seeds: one `titans evaluate` per seed
#   LIMIT: seconds for the whole plan; an evaluation still running then is stopped (its stream's later lines too)
#
# Made for the `device` tool (its machine lacks pydantic: the cp312 wheels in .whl/), e.g.
#   run  command: "PLAN=benchmarks/plans/session19.txt bash benchmarks/evaluate_gpu.sh"
#        carry: [".whl", ".carry/gcide.dict.dz", ".carry/bab"]   timeout_s: 600
# Files: log.txt, eval.tar.gz (eval/NAME_seedS/: results.json, results.md, heat maps; eval/NAME_seedS.log).
set -u
OUT=${OUT:?set OUT to a folder for the results}
PLAN=${PLAN:?set PLAN to a plan file}
SOURCE=${SOURCE:-.carry/gcide.dict.dz}
LIMIT=${LIMIT:-500}
PIECE=${PIECE:-8192}
BATCH=${BATCH:-4}  # examples streamed together (titans evaluate --batch-size); session 19's calls ran with 4
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TITANS_TRITON_AUTOTUNE=0
LOG=$OUT/log.txt
EVAL=/tmp/titans_eval/eval
rm -rf /tmp/titans_eval && mkdir -p "$EVAL"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
MPS_DIR=""
if command -v nvidia-cuda-mps-control > /dev/null; then
  MPS_DIR=$(mktemp -d)
  export CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_DIR/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && echo "MPS daemon started" >> "$LOG"
fi
END=$(( $(date +%s) + LIMIT ))

run_stream() {  # the plan's lines of stream $1, in order, each seed one evaluation, until the time runs out
  local stream=$1 s name ckpt tasks lengths samples seeds seed left args t0
  grep -v '^\s*#' "$PLAN" | while read -r s name ckpt tasks lengths samples seeds; do
    [ "$s" = "$stream" ] || continue
    for seed in ${seeds//,/ }; do
      left=$(( END - $(date +%s) ))
      if [ "$left" -le 5 ]; then echo "$name seed $seed: not run (time)" >> "$LOG"; continue; fi
      args=()
      for t in ${tasks//,/ }; do args+=(--task "$t"); done
      t0=$(date +%s)
      # stdin from /dev/null: the loop reads the plan from its stdin, which a child must not consume
      timeout "$left" python3 -m titans evaluate --checkpoint "$ckpt" "${args[@]}" --data "$SOURCE" \
        --lengths "$lengths" --depths 0.5 --samples "$samples" --piece "$PIECE" --batch-size "$BATCH" --seed "$seed" \
        --output "$EVAL/${name}_seed$seed" < /dev/null > "$EVAL/${name}_seed$seed.log" 2>&1
      echo "$name seed $seed: exit $? in $(( $(date +%s) - t0 )) s" >> "$LOG"
    done
  done
}

for stream in $(grep -v '^\s*#' "$PLAN" | awk 'NF {print $1}' | sort -u); do
  run_stream "$stream" &
done
wait
[ -n "$MPS_DIR" ] && echo quit | nvidia-cuda-mps-control
tar -czf "$OUT/eval.tar.gz" -C /tmp/titans_eval eval
cat "$LOG"
