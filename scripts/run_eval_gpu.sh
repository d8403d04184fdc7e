#!/usr/bin/env bash
# Evaluate a checkpoint on DATA_PATH/val with one GPU. Without CONFIG_PATH, eval.py uses the
# configuration the run saved beside the checkpoint (RUN/ckpt/config.yaml) and writes RUN/eval_metrics.json.
usage() { echo "usage: bash $0 DATA_PATH CHECKPOINT_PATH [CONFIG_PATH]"; }
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; exit 1; fi
DATA_PATH=$1; CHECKPOINT_PATH=$2; CONFIG_PATH=${3:-}
[ -d "$DATA_PATH" ] || { echo "error: DATA_PATH '$DATA_PATH' is not a folder"; usage; exit 1; }
[ -f "$CHECKPOINT_PATH" ] || { echo "error: CHECKPOINT_PATH '$CHECKPOINT_PATH' is not a file"; usage; exit 1; }
[ -z "$CONFIG_PATH" ] || [ -f "$CONFIG_PATH" ] || { echo "error: CONFIG_PATH '$CONFIG_PATH' is not a file"; usage; exit 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARGS=(--data_path="$DATA_PATH" --checkpoint_file_path="$CHECKPOINT_PATH" --device_target=GPU)
[ -z "$CONFIG_PATH" ] || ARGS+=(--config_path="$CONFIG_PATH")
[ -z "${OUTPUT_PATH:-}" ] || ARGS+=(--output_path="$OUTPUT_PATH")
set -x
python "$ROOT/eval.py" "${ARGS[@]}"
