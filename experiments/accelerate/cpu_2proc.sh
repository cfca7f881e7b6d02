#!/bin/bash
# Two CPU processes (gloo), e.g.: bash experiments/accelerate/cpu_2proc.sh experiments/smoke.yaml
set -euo pipefail
export OMP_NUM_THREADS=1
exec .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m forgetkit.train "$@" \
  distributed.cpu=true
