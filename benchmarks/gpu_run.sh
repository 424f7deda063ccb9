#!/bin/bash
# On the lent GPU machine (device tool), in one call:
#   run(command="bash benchmarks/gpu_run.sh [table|generate] [sd15_training.py options]",
#       carry=[".whl"], timeout_s=570)
# after benchmarks/gpu_wheels.sh has filled .whl/ here. Installs the wheels beside the image's
# CUDA torch, checks that difftrain imports, then runs the GPU figures into $OUT (the logs come back):
#   table     issue 17's table: benchmarks/sd15_training.py, SD 1.5's shape at 512 px, batch 1 and 4,
#             bf16 and fp16, full and LoRA, difftrain (no cache, cached, cached + compiled) against the
#             plain loop; ~6-8 min on an H200 by estimate (never run yet: give the call its 570 s).
#   generate  benchmarks/generate_speed.py --compile (difftrain generate's defaults and --compile
#             against diffusers' fp16 pipeline). One per call: each fills most of a call's 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-table}
shift || true
table_options=${*:---compile}  # e.g. "--batches 4 --precisions bf16" to fit a short lease
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
if [ "$what" = table ]; then
    timeout 520 python3 sd15_training.py $table_options 2>&1 | grep -v "Loading weights" | tee "$out/sd15_training.txt"
fi
if [ "$what" = generate ]; then
    timeout 300 python3 generate_speed.py --compile --steps 20 2>&1 | tee "$out/generate_speed.txt"
fi
