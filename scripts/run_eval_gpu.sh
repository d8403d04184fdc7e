#!/usr/bin/env bash
# Evaluate a checkpoint on DATA_PATH/val with one GPU, in the model zoo's argument order. Without
# CONFIG_PATH, eval.py uses the configuration the run saved beside the checkpoint (RUN/ckpt/config.yaml)
# and writes RUN/eval_metrics.json. DATA_PATH may be the val folder itself, as the model zoo's.
#   bash run_eval_gpu.sh DATA_PATH CHECKPOINT_PATH [CONFIG_PATH]
USAGE="bash $(basename "$0") DATA_PATH CHECKPOINT_PATH [CONFIG_PATH]"
. "$(dirname "$0")/launch_args.sh"
nargs 2 3 $#
data_root DATA_PATH "$1" val
need_file CHECKPOINT_PATH "$2"
[ $# -lt 3 ] || need_file CONFIG_PATH "$3"
ARGS=(--data_path="$DATA_ROOT" --checkpoint_file_path="$2" --device_target=GPU)
[ $# -lt 3 ] || ARGS+=(--config_path="$3")
[ -z "${OUTPUT_PATH:-}" ] || ARGS+=(--output_path="$OUTPUT_PATH")
set -x
python "$ROOT/eval.py" "${ARGS[@]}"
