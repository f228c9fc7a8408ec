#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md ("GPU: MFU") and docs/scaling.md, on one GPU, in order
# of what matters (each run has its own time limit, so one that fails or hangs costs only itself):
#   1. fused (cuDNN) attention against the plain path in bf16, Base (benchmarks/fused_attention_check.py)
#   2. Base train steps in bf16 at the per-GPU batch of the paper's batch on 64 GPUs (64 + 8 rows):
#      fused attention + scan + full remat, then one switch at a time
#   3. Huge at the same batch, and Base at 4x the batch
# Synthetic batches: no TensorFlow or seqio needed.
#
#   bash benchmarks/gpu_mfu.sh [LOG_DIR]      # one log per run in LOG_DIR (default /tmp/gpu_mfu)
set -u
cd "$(dirname "$0")/.."
log_dir=${1:-/tmp/gpu_mfu}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
# XLA's Triton matmul fusion aborted every Base compile on an H200 with jax 0.11.2: cuBLAS instead.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}"
py=${PYTHON:-python3}
per_run=${PER_RUN_S:-240}  # Base compiles in 30-50 s scanned; unscanned took over 150 s

run() {  # NAME ARGS...: one run, its log, its last line in summary.txt
  local name=$1; shift
  echo "== $name: $*"
  timeout "$per_run" "$py" "$@" > "$log_dir/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$log_dir/$name.log"
  echo "$name rc=$rc $(tail -n 1 "$log_dir/$name.log")" >> "$log_dir/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1
"$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

bf16=(--gin.ModelConfig.dtype="'bfloat16'")
fast=("${bf16[@]}" --gin.ModelConfig.attention="'fused'" --gin.ModelConfig.scan_layers=True)
step=(benchmarks/train_step.py --steps=10 --rounds=3 --warmup=2)
batch=(--image_text_batch=64 --text_batch=8 --image_text_length=32 --text_length=128)

run fused_check benchmarks/fused_attention_check.py --model=base --batch=8 \
    --gin.ModelConfig.scan_layers=True
run base_fused_scan_remat "${step[@]}" --model=base "${batch[@]}" "${fast[@]}" \
    --gin.ModelConfig.remat="'full'"
run base_fused_scan "${step[@]}" --model=base "${batch[@]}" "${fast[@]}"
run base_plain_scan "${step[@]}" --model=base "${batch[@]}" "${bf16[@]}" \
    --gin.ModelConfig.scan_layers=True
run base_fused "${step[@]}" --model=base "${batch[@]}" "${bf16[@]}" \
    --gin.ModelConfig.attention="'fused'"
run huge_fused_scan_remat "${step[@]}" --model=huge "${batch[@]}" "${fast[@]}" \
    --gin.ModelConfig.remat="'full'"
run base_fused_scan_4x "${step[@]}" --model=base --image_text_batch=256 --text_batch=32 \
    --image_text_length=32 --text_length=128 "${fast[@]}"
run huge_fused_scan_dots "${step[@]}" --model=huge "${batch[@]}" "${fast[@]}" \
    --gin.ModelConfig.remat="'dots_saveable'"
echo "== summary"
cat "$log_dir/summary.txt"
