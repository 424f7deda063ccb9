#!/bin/bash
# On the lent GPU machine (device tool), one call per line:
#   run(command="bash benchmarks/gpu_run.sh table", carry=[".whl"], timeout_s=570)
#   run(command="bash benchmarks/gpu_run.sh table --batches 4 --precisions bf16 --compile blocks", carry=[".whl"], ...)
#   run(command="bash benchmarks/gpu_run.sh table --batches 4 --precisions bf16 --methods full --workers 4", ...)
#   run(command="bash benchmarks/gpu_run.sh generate", carry=[".whl"], ...)
#   run(command="bash benchmarks/gpu_run.sh class", carry=[".whl"], ...)
# after benchmarks/gpu_wheels.sh has filled .whl/ here. Installs the wheels beside the image's
# CUDA torch, checks that difftrain imports, then runs the GPU figures into $OUT (the logs come back):
#   table     issue 17's table, benchmarks/sd15_training.py (options after `table` go to it; by
#             default SD 1.5's shape at 512 px, batch 1 and 4, bf16 and fp16, full and LoRA,
#             difftrain without and with the cache against the plain loop). The 8 combinations
#             took 310 s on an H200 (2026-12-04); rows print as they come.
#             --compile [blocks,model] compiles the SD UNet once per row and scope: give it one combination.
#             The whole UNet (model) did not compile in 235 s there; its transformer blocks alone (blocks)
#             compile in a quarter of the time on a CPU (60 s against 234 s), so run blocks first.
#             --workers N adds the uncached step with N data loader processes (data.num_workers, default 0).
#   generate  benchmarks/generate_speed.py --compile (difftrain generate's defaults and --compile
#             against diffusers' fp16 pipeline).
#   class     benchmarks/class_images.py on SD 1.5's shape at 512 px: DreamBooth's class images in
#             batches of 4 under fp16 against one fp32 image at a time.
# GPU_TIMEOUT (seconds, default 520) bounds the benchmark; logs are appended, so two calls of this
# script in one device command (the table, then a --compile row with the time left) share a file.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-table}
shift || true
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate, difftrain.training.trainer as t
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" \
    2>&1 | tee -a "$out/gpu.txt" || exit 1
cd benchmarks
case "$what" in
    table) timeout "${GPU_TIMEOUT:-520}" python3 sd15_training.py "$@" 2>&1 | grep --line-buffered -v "Loading weights" \
               | tee -a "$out/sd15_training.txt" ;;
    generate) timeout "${GPU_TIMEOUT:-520}" python3 generate_speed.py --compile --steps 20 2>&1 | tee -a "$out/generate_speed.txt" ;;
    class) timeout "${GPU_TIMEOUT:-520}" python3 class_images.py --sd15 --size 512 --images 16 --steps 25 2>&1 \
               | tee -a "$out/class_images.txt" ;;
    *) echo "gpu_run.sh: table, generate or class, not $what"; exit 2 ;;
esac
exit $?  # under pipefail: the benchmark's own status (124 when timeout stopped it)
