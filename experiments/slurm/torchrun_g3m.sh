#!/bin/bash
# Train the paper's G3M model on one machine with torchrun (all its GPUs). For several machines, run this on each
# with --nnodes, --node_rank and --rdzv_endpoint set, and --trainer.num_nodes to match.
set -euo pipefail
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
.venv/bin/torchrun --standalone --nproc_per_node "$GPUS" -m lightning_modules.cli fit \
  --config configs/experiment/nxtp_g3m.yaml --trainer.devices "$GPUS" "$@"
