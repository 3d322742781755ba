#!/usr/bin/env bash
# Teach the default model two kinds it has never seen, from 2,000 images tagged by hand-style `.tags` sidecars (no
# captions), with and without replay of its own data; README "Teach new labels without forgetting".
#
#   bash experiments/teach_new_labels.sh                # the kinds umbrella and anchor
#   NEW="kite ladder" bash experiments/teach_new_labels.sh
#   SCENES=all bash experiments/teach_new_labels.sh     # the 2,000 scenes drawn from every kind alike
#   SCENES=new bash experiments/teach_new_labels.sh     # the 2,000 scenes hold only the new kinds
#
# 1. scenes without the new kinds (data/teach/base) and a base model trained on them as `make train` trains;
# 2. 2,000 scenes written as a folder of images with `.tags` sidecars, as users have them, and made into shards with
#    `nxtp shards`: scenes of every kind with at least one object of a new kind in each (SCENES=featured, the
#    default: photos collected for the new kinds, every object in them tagged), of every kind alike (SCENES=all) or
#    of the new kinds only (SCENES=new);
# 3. two fine-tunings of the base model, FINETUNE_STEPS steps each: on the new shards alone, and mixed NEW_WEIGHT:1
#    with a replay of the base data (`data.train_shards` with weights);
# 4. each model tested on the default test split (every kind), and the table: the new kinds' recall and precision
#    at top 5, the old kinds' F1 (micro, over their labels) and each fine-tuning's training time.
# Everything lands in data/teach/KINDS/ and logs/teach/KINDS/ (KINDS: the new kinds joined by "_"); a step whose
# output exists is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
NEW=${NEW:-umbrella anchor}
FINETUNE_STEPS=${FINETUNE_STEPS:-1000}
NEW_WEIGHT=${NEW_WEIGHT:-1}  # the new shards' weight against the replay's 1
SCENES=${SCENES:-featured}  # featured: every kind, a new one in each scene; all: every kind alike; new: new kinds only
TAG=$(echo "$NEW" | tr -s ' ' '_')
DATA=data/teach/$TAG
LOGS=logs/teach/$TAG
VAL=data/shapes/val/shard-000000.tar  # every kind, with captions: `make data`
TEST=data/shapes/test/shard-000000.tar
FIT=("$BIN/nxtp" fit --config configs/experiment/default.yaml --trainer.logger.init_args.save_dir "$LOGS"
     --data.test_shards "$TEST" --test_after_fit true)

[ -f "$TEST" ] || { echo "no $TEST: run \`make data\` first" >&2; exit 2; }
# shellcheck disable=SC2086  # NEW is a list of kinds
[ -d $DATA/base/train ] || "$BIN/python" -m datamodules.synthetic --out $DATA/base --exclude-kinds $NEW \
    --train 40000 --val 1000 --test 0 --seed 1
# shellcheck disable=SC2086
case "$SCENES" in
    all) kinds=() ;;
    new) kinds=(--kinds $NEW) ;;
    featured) kinds=(--feature-kinds $NEW) ;;
    *) echo "SCENES=$SCENES: use all, new or featured" >&2; exit 2 ;;
esac
[ -d $DATA/${SCENES}_scenes/train ] || "$BIN/python" -m datamodules.synthetic --out $DATA/${SCENES}_scenes \
    "${kinds[@]}" --train 2000 --val 0 --test 0 --seed 2
if [ ! -d $DATA/${SCENES}_folder ]; then  # the scenes as the folder a user has: KEY.jpg and KEY.tags, no caption
    "$BIN/python" - "$DATA/${SCENES}_scenes/train" "$DATA/${SCENES}_folder" <<'EOF'
import json, sys, tarfile
from pathlib import Path
source, folder = Path(sys.argv[1]), Path(sys.argv[2])
folder.mkdir(parents=True)
for shard in sorted(source.glob("*.tar")):
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "jpg":
                (folder / member.name).write_bytes(tar.extractfile(member).read())
            elif ext == "json":
                labels = json.loads(tar.extractfile(member).read())["labels"]
                (folder / f"{key}.tags").write_text("\n".join(labels) + "\n")
EOF
fi
[ -d $DATA/$SCENES/train ] || "$BIN/nxtp" shards $DATA/${SCENES}_folder --out $DATA/$SCENES --val-fraction 0.05 \
    --no-progress | tee $DATA/${SCENES}_summary.txt

base_train="$DATA/base/train/shard-{000000..000019}.tar"
new_train=$(sed -n "s/.*--data.train_shards '\([^']*\)'.*/\1/p" $DATA/${SCENES}_summary.txt)  # what `nxtp shards` said
[ -f $LOGS/base/version_0/metrics.json ] || "${FIT[@]}" --trainer.logger.init_args.name base \
    --data.train_shards "$base_train" --data.val_shards $DATA/base/val/shard-000000.tar
base=$LOGS/base/version_0/checkpoints/last.ckpt
tune=(--model.optimization.init_from "$base" --trainer.max_steps "$FINETUNE_STEPS"
      --trainer.val_check_interval "$FINETUNE_STEPS" --data.val_shards "$VAL" --data.labels_from given)
new_only=${SCENES}_only_s$FINETUNE_STEPS replay=${SCENES}_replay_w${NEW_WEIGHT}_s$FINETUNE_STEPS
[ -f $LOGS/$new_only/version_0/metrics.json ] || "${FIT[@]}" --trainer.logger.init_args.name $new_only "${tune[@]}" \
    --data.train_shards "$new_train"
[ -f $LOGS/$replay/version_0/metrics.json ] || "${FIT[@]}" --trainer.logger.init_args.name $replay "${tune[@]}" \
    --data.train_shards "[{shards: \"$new_train\", weight: $NEW_WEIGHT}, {shards: \"$base_train\", weight: 1}]"

"$BIN/python" - "$LOGS" $NEW <<'EOF'
import csv, json, sys
from pathlib import Path
logs, new = Path(sys.argv[1]), set(sys.argv[2:])
print(f"| model | new kinds' recall@5 ({', '.join(sorted(new))}) | their precision@5 | old kinds' F1@5 | fine-tuning time |")
print("|---|---|---|---|---|")
runs = sorted(p.name for p in logs.iterdir() if (p / "version_0" / "per_label_test.csv").is_file())
for name in ["base"] + [r for r in runs if r != "base"]:
    rows = list(csv.DictReader(open(logs / name / "version_0" / "per_label_test.csv")))
    def total(labels, column):
        return sum(int(r[column]) for r in rows if r["label"] in labels)
    old = {r["label"] for r in rows} - new
    recall = total(new, "hits") / max(1, total(new, "references"))
    precision = total(new, "hits") / max(1, total(new, "predicted"))  # naming them everywhere is no answer
    f1 = 2 * total(old, "hits") / max(1, total(old, "references") + total(old, "predicted"))
    seconds = json.loads((logs / name / "version_0" / "metrics.json").read_text()).get("train_time_s")
    time = "(base)" if name == "base" else f"{seconds:.0f} s"
    print(f"| {name} | {recall:.3f} | {precision:.3f} | {f1:.4f} | {time} |")
EOF
