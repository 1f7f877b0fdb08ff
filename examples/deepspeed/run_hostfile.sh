#!/usr/bin/env bash
# Several nodes listed in $HOSTFILE ("name slots=N" per line); the launcher reaches them over ssh.
set -euo pipefail
: "${DATA:?set DATA to the data-bin directory}"
: "${HOSTFILE:?set HOSTFILE}"
SAVE=${SAVE:-checkpoints/rmt_wt103_ds}
NODES=${NODES:-$(grep -c . "$HOSTFILE")}
GPUS=${GPUS:-8}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json,ds_configs/bf16.json}
deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS" "$(which rmt-deepspeed-train)" "$DATA" \
  --user-dir user_dir --task rmt_lm --arch rmt_wt103 --criterion rmt_cross_entropy --batch-size 8 \
  --bptt-unroll 4 --checkpoint-segments --optimizer adam --lr 2.5e-4 --lr-scheduler cosine \
  --warmup-updates 4000 --max-update 200000 --save-dir "$SAVE" --save-interval-updates 5000 \
  --deepspeed-config "$DS_CONFIG" "$@"
