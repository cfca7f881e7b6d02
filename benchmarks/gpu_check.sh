#!/usr/bin/env bash
# The GPU check: a ~1B random-init Llama (Llama-3.2-1B's body, SmolLM2's 49152-token
# vocabulary, 1.07 B parameters) fully fine-tuned in bf16 (autocast over fp32 master weights) on
# one GPU: forgetkit's padding-free loop against HF Trainer's best configurations (target
# tokens/s, MFU against the GPU's dense bf16 datasheet peak, each run's
# torch.cuda.max_memory_allocated against forgetkit's memory estimate), then the memory
# estimator's rows for that model (fixed batches, EWC and checkpointing on/off). About 10 minutes
# on one H100/H200.
#
#   bash benchmarks/gpu_check.sh prepare        # here, with `make install` done: writes .gpu/
#   bash benchmarks/gpu_check.sh run [OUTDIR]   # on the GPU machine, from the repository root
#
# `prepare` saves SmolLM2-135M's tokenizer (from the offline asset, which the GPU machine need
# not have) and downloads pure-Python wheels of the transformers and accelerate versions this
# repository is tested with; `run` installs those into a private directory (nothing else
# changes) and needs only python3 with a CUDA torch. Record what it prints in
# benchmarks/README.md with the date and the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

if [ "$mode" = prepare ]; then
    PY=${PY:-.venv/bin/python}
    rm -rf .gpu && mkdir -p .gpu/whl
    "$PY" benchmarks/throughput.py --save-tokenizer .gpu/tokenizer
    # transformers and accelerate at the tested versions with the libraries transformers
    # checks at import (huggingface_hub 2.x and its HTTP stack, tokenizers, regex, ...): the GPU
    # image's own (huggingface_hub 1.x there in 2026-11) would stop `import transformers`.
    # Binary wheels for the GPU machine's CPython (GPU_PY, 3.12 in its image).
    pkgs="transformers accelerate huggingface_hub httpx2 httpcore2 h11 truststore anyio idna
          click hf_xet regex tokenizers safetensors typing_extensions tqdm filelock fsspec
          packaging"
    pins=$("$PY" -c "import importlib.metadata as m, sys
print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $pkgs)
    plat=""
    for t in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do plat="$plat --platform $t"; done
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
        --python-version "${GPU_PY:-3.12}" $plat -d .gpu/whl $pins
    du -sh .gpu
    exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 prepare | run [OUTDIR]" >&2; exit 2; }
[ -f .gpu/tokenizer/medmcqa_train.jsonl ] || { echo ".gpu/tokenizer (tokenizer + MedMCQA split) missing: run '$0 prepare' first" >&2; exit 2; }
out=${2:-${OUT:-gpu-out}}
mkdir -p "$out"
PY=${PY:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fk-site .gpu/whl/*.whl
export PYTHONPATH="/tmp/fk-site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# fail in seconds, not after the first worker, when an import is missing there
"$PY" -c "import transformers, accelerate, forgetkit.train.loop
from transformers import Trainer, DataCollatorWithFlattening" || exit 3
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$out/gpu.txt"
"$PY" benchmarks/throughput.py --device cuda --precision bf16 --model llama1b \
    --dist longtail --tokenizer .gpu/tokenizer \
    --medmcqa .gpu/tokenizer/medmcqa_train.jsonl --batch-size 8 --grad-accum 1 --repeats 2 \
    --methods hf-grouped,hf-flat,fk-flat,fk-grouped --keep-going --threads 8 \
    --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log" || echo "throughput: exit $?"
left=$(( 540 - SECONDS )); [ "$left" -gt 60 ] || left=60  # the device call's 600 s limit
timeout "$left" "$PY" benchmarks/memory.py --sizes llama1b --no-vocab-rows --precision bf16 --seq 1024 \
    --batch 8 --json "$out/memory.json" 2>&1 | tee "$out/memory.log" || echo "memory: exit $?"
