#!/usr/bin/env bash
# Finetune an ImageNet iSQRT-COV checkpoint on a fine-grained dataset (CUB, Aircraft, Cars).
usage() {
  echo "usage: bash $0 DATA_PATH CONFIG_PATH PRETRAINED_CKPT [DEVICE_NUM]"
  echo "  CONFIG_PATH e.g. ./config/resnet50_cub200_config.yaml; PRETRAINED_CKPT an ImageNet .ckpt"
  echo "  (a fast-MPN-COV .pth goes through scripts/convert_torch_checkpoint.py first)"
}
if [ $# -lt 3 ] || [ $# -gt 4 ]; then usage; exit 1; fi
DATA_PATH=$1; CONFIG_PATH=$2; PRETRAINED=$3; DEVICE_NUM=${4:-1}
[ -d "$DATA_PATH" ] || { echo "error: DATA_PATH '$DATA_PATH' is not a folder"; usage; exit 1; }
[ -f "$CONFIG_PATH" ] || { echo "error: CONFIG_PATH '$CONFIG_PATH' is not a file"; usage; exit 1; }
[ -f "$PRETRAINED" ] || { echo "error: PRETRAINED_CKPT '$PRETRAINED' is not a file"; usage; exit 1; }
[[ "$DEVICE_NUM" =~ ^[1-9][0-9]*$ ]] || { echo "error: DEVICE_NUM '$DEVICE_NUM' is not a positive integer"; usage; exit 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTPUT_PATH=${OUTPUT_PATH:-./output_finetune}
set -x
if [ "$DEVICE_NUM" -eq 1 ]; then
  python "$ROOT/train.py" --config_path="$CONFIG_PATH" --device_target=GPU --data_path="$DATA_PATH" \
    --pre_trained="$PRETRAINED" --output_path="$OUTPUT_PATH"
else
  mpirun --allow-run-as-root -n "$DEVICE_NUM" --output-filename "$OUTPUT_PATH/log_output" --merge-stderr-to-stdout \
    python "$ROOT/train.py" --config_path="$CONFIG_PATH" --run_distribute=True --device_num="$DEVICE_NUM" \
    --device_target=GPU --data_path="$DATA_PATH" --pre_trained="$PRETRAINED" --output_path="$OUTPUT_PATH"
fi
