#!/usr/bin/env bash
# Evaluate a checkpoint on DATA_PATH/val with one GPU.
usage() { echo "usage: bash $0 DATA_PATH CHECKPOINT_PATH CONFIG_PATH"; }
if [ $# -ne 3 ]; then usage; exit 1; fi
DATA_PATH=$1; CHECKPOINT_PATH=$2; CONFIG_PATH=$3
[ -d "$DATA_PATH" ] || { echo "error: DATA_PATH '$DATA_PATH' is not a folder"; usage; exit 1; }
[ -f "$CHECKPOINT_PATH" ] || { echo "error: CHECKPOINT_PATH '$CHECKPOINT_PATH' is not a file"; usage; exit 1; }
[ -f "$CONFIG_PATH" ] || { echo "error: CONFIG_PATH '$CONFIG_PATH' is not a file"; usage; exit 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
set -x
python "$ROOT/eval.py" --data_path="$DATA_PATH" --checkpoint_file_path="$CHECKPOINT_PATH" \
  --config_path="$CONFIG_PATH" --device_target="GPU" --output_path="${OUTPUT_PATH:-./output}"
