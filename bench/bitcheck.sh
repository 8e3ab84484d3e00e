#!/bin/bash
# The behaviour check of a restructuring: the same short `compare` and make-demo stages from one frozen
# worktree. Run it at the commit before and at the commit after, then `python bench/bitdiff.py OUT1 OUT2`.
#   git worktree add /tmp/before <commit>; git worktree add /tmp/after <commit>
#   lmdistill prune --model smollm2-135m-instruct --keep-layers 0,3,6,9,12,15,18,21,24,27 --out /tmp/student10
#   bench/bitcheck.sh /tmp/before /tmp/bit_before /tmp/student10 & bench/bitcheck.sh /tmp/after /tmp/bit_after /tmp/student10
# One thread each (OMP_NUM_THREADS=1), so that the two runs' kernels make the same reductions.
set -euo pipefail
TREE=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd); STUDENT=$3
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
export OMP_NUM_THREADS=1 PYTHONPATH=$TREE/src LMDISTILL_DATA_DIR=${LMDISTILL_DATA_DIR:-$TREE/../shared/data}
cd "$TREE"
# compare: stages 0-1 and all nine methods, 4 steps each, dev selection every 2 steps, 8 prompts per set
"$PY" -m lmdistill.cli compare configs/compare_dolly.yaml output_dir="$OUT/compare" student="$STUDENT" \
  train.steps=4 train.max_train_examples=16 eval_max_examples=8 eval_max_new_tokens=16 \
  teacher_sft_steps=2 student_init_steps=2 dev_examples=8 eval_every=2 > "$OUT/compare.log" 2>&1
# make demo's two training stages, shortened
"$PY" -m lmdistill.cli train src/lmdistill/configs/demo_sft.yaml student="$STUDENT" steps=20 \
  output_dir="$OUT/demo_sft" > "$OUT/demo_sft.log" 2>&1
"$PY" -m lmdistill.cli train src/lmdistill/configs/demo_promptkd.yaml student="$OUT/demo_sft/student" steps=4 \
  output_dir="$OUT/demo_promptkd" > "$OUT/demo_promptkd.log" 2>&1
touch "$OUT/DONE"
