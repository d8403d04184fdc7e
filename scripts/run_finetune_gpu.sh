#!/usr/bin/env bash
# Finetune an ImageNet checkpoint on a fine-grained dataset (CUB, Aircraft, Cars): PRETRAINED_CKPT a
# MindSpore .ckpt (this project's, mindcv's or the model zoo's ResNet), or a PyTorch one converted by
# scripts/convert_torch_checkpoint.py.
#   bash run_finetune_gpu.sh DATA_PATH CONFIG_PATH PRETRAINED_CKPT [DEVICE_NUM]
USAGE="bash $(basename "$0") DATA_PATH CONFIG_PATH PRETRAINED_CKPT [DEVICE_NUM]"
. "$(dirname "$0")/launch_args.sh"
nargs 3 4 $#
data_root DATA_PATH "$1" train
need_file CONFIG_PATH "$2"
need_file PRETRAINED_CKPT "$3"
N=${4:-1}
is_count "$N" || fail "DEVICE_NUM '$N' is not a positive integer"
OUTPUT_PATH=${OUTPUT_PATH:-./output_finetune}
ARGS=(--config_path="$2" --device_target=GPU --data_path="$DATA_ROOT" --pre_trained="$3" --output_path="$OUTPUT_PATH")
if [ "$N" -eq 1 ]; then
  set -x
  python "$ROOT/train.py" "${ARGS[@]}"
else
  command -v mpirun >/dev/null || fail "mpirun not found: apt-get install openmpi-bin libopenmpi-dev"
  mkdir -p "$OUTPUT_PATH"
  set -x
  mpirun --allow-run-as-root -n "$N" --output-filename "$OUTPUT_PATH/log_output" --merge-stderr-to-stdout \
    python "$ROOT/train.py" "${ARGS[@]}" --run_distribute=True --device_num="$N"
fi
