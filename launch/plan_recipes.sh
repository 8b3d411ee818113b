#!/usr/bin/env bash
# The README's plan tables: every LLaVA-1.5 recipe compiled ahead of time for v5p-32 and v5e-256 on this host
# (no TPU needed; pip install -e '.[tpu]'). Run from the repository root:
#   bash launch/plan_recipes.sh [OUT_DIR]
# One report per recipe goes to OUT_DIR (default /tmp/plan_recipes); one compile at a time, 1-10 minutes each.
set -uo pipefail
out=${1:-/tmp/plan_recipes}
mkdir -p "$out"
plan() { name=$1; shift; echo "$name"; python -m llava_jax.plan "$@" > "$out/$name.txt" 2> "$out/$name.err" \
  || echo "  failed: see $out/$name.err"; }
unpacked=(--config.data.packing=none)
for model in vicuna7b vicuna13b; do
  s1="configs/stage1.py:$model"
  plan "${model}_stage1_v5p32" --config="$s1" --topology=v5p-32 --mesh.fsdp=16
  plan "${model}_stage1_v5e256" --config="$s1" --topology=v5e-256 --mesh.fsdp=64 --mesh.tensor=4
  plan "${model}_stage1_unpacked_v5p32" --config="$s1" --topology=v5p-32 --mesh.fsdp=16 "${unpacked[@]}" \
    --config.train.global_batch_size=256
  plan "${model}_stage1_unpacked_v5e256" --config="$s1" --topology=v5e-256 --mesh.fsdp=256 "${unpacked[@]}" \
    --config.train.global_batch_size=256
  for variant in "" ",lora"; do
    s2="configs/stage2.py:$model$variant"
    name="${model}_stage2${variant/,/_}"
    plan "${name}_v5p32" --config="$s2" --topology=v5p-32 --mesh.fsdp=16
    plan "${name}_v5e256" --config="$s2" --topology=v5e-256 --mesh.fsdp=32 --mesh.tensor=8
    plan "${name}_unpacked_v5p32" --config="$s2" --topology=v5p-32 --mesh.fsdp=16 "${unpacked[@]}" \
      --config.train.global_batch_size=128
    plan "${name}_unpacked_v5e256" --config="$s2" --topology=v5e-256 --mesh.fsdp=128 --mesh.tensor=2 \
      "${unpacked[@]}" --config.train.global_batch_size=128
  done
done
