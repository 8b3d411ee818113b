#!/usr/bin/env bash
# The throughput checks of one NVIDIA GPU (H100 / H200, about 10 minutes): run from the repository root.
#   bash launch/throughput_gpu.sh [OUT_DIR]
# Every bench line prints unpacked and packed rows; JSON results go to OUT_DIR (default /tmp/throughput).
set -euo pipefail
out=${1:-/tmp/throughput}
mkdir -p "$out"
bench() { name=$1; shift; timeout 900 python -m llava_jax.bench train --dtype bfloat16 --repeats 5 "$@" \
  --json "$out/$name.json" 2>&1 | grep -v '^Writing' | tee "$out/$name.txt"; }

# 7B stage-2 LoRA step (r128, the recipe's), 4096-token rows (packed ~0.95 real tokens per computed token),
# XLA vs cuDNN attention.
bench 7b_lora_xla --preset llava_1_5_7b --lora --batch 2 --seq 4096 --remat save_qkv_proj --attention xla
bench 7b_lora_cudnn --preset llava_1_5_7b --lora --batch 2 --seq 4096 --remat save_qkv_proj --attention cudnn
# Full fine-tuning of a 1.4B LLaMA with CLIP-L/336, remat policies.
for remat in none save_proj_bf16 save_qkv_proj full; do
  bench 1b_full_$remat --preset llava_1b --batch 4 --seq 4096 --remat $remat --attention cudnn
done
# Decode at batch 1 against the memory-bandwidth bound.
timeout 600 python -m llava_jax.bench generate --preset llava_1_5_7b --dtype bfloat16 --batch-sizes 1 \
  | tee "$out/decode.txt"
