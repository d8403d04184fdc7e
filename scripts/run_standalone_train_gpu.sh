#!/usr/bin/env bash
# Single-GPU training.
usage() {
  echo "usage: bash $0 DATA_PATH CONFIG_PATH [RESUME_CKPT]"
  echo "  DATA_PATH    folder holding train/ and val/; CONFIG_PATH a YAML from config/"
}
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; exit 1; fi
DATA_PATH=$1; CONFIG_PATH=$2; RESUME_CKPT=${3:-}
[ -d "$DATA_PATH" ] || { echo "error: DATA_PATH '$DATA_PATH' is not a folder"; usage; exit 1; }
[ -f "$CONFIG_PATH" ] || { echo "error: CONFIG_PATH '$CONFIG_PATH' is not a file"; usage; exit 1; }
if [ -n "$RESUME_CKPT" ] && [ ! -f "$RESUME_CKPT" ]; then echo "error: RESUME_CKPT '$RESUME_CKPT' is not a file"; usage; exit 1; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EXTRA=()
[ -n "$RESUME_CKPT" ] && EXTRA=(--resume_ckpt="$RESUME_CKPT")
set -x
python "$ROOT/train.py" --config_path="$CONFIG_PATH" --device_target="GPU" --data_path="$DATA_PATH" \
  --output_path="${OUTPUT_PATH:-./output}" "${EXTRA[@]}"
