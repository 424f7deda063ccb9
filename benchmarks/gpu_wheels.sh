#!/bin/bash
# Fills .whl/ with the locked wheels that the lent GPU machine's image lacks or holds at other
# versions (it has torch, accelerate, safetensors, numpy, pyyaml, tqdm, ... but no diffusers or
# pydantic, and an older transformers and huggingface_hub). The device tool cannot reach a package
# index, so they travel: run this here, then `run` with carry [".whl"] and
# `bash benchmarks/gpu_run.sh` (see that file). About 35 MB, under the tool's 64 MiB a call.
set -euo pipefail
cd "$(dirname "$0")/.."
names="diffusers transformers huggingface_hub peft pydantic pydantic_core annotated-types typing-inspection
       typing_extensions tokenizers torchsde trampoline importlib_metadata lazy-importer zipp httpx2 httpcore2
       truststore pillow"
rm -rf .whl  # two versions of one package there would stop the whole install on the machine
mkdir -p .whl
for name in $names; do
    pinned=$(grep -i -m1 "^${name}==" requirements.lock | sed 's/ .*//') || { echo "$name is not in requirements.lock"; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$pinned" 2>&1 | { grep -v "is ignored" || true; }
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "pip could not download $pinned"; exit 1; }
done
ls .whl | wc -l | xargs echo "wheels in .whl:"
du -sh .whl
