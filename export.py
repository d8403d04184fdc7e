"""Export a checkpoint to MINDIR (or ONNX / AIR) for inference.

Input contract: uint8 RGB images, 1x3xSxS (S = image_size) on the 0-255 scale, decoded, resized
and centre-cropped as eval.py does (src/data/pipeline.py eval_ops); the model normalises them with
the run's mean/std inside (src/models/preprocess.py). Output: float32 logits, 1 x num_classes.

    python export.py --checkpoint_file_path=RUN/ckpt/best.ckpt --file_format=MINDIR
builds the network from the configuration the run saved beside its checkpoint (RUN/ckpt/config.yaml,
command-line keys win; --config_path=FILE uses FILE instead) and writes RUN/<arch>_<head>.mindir.
"""
import os
import sys

from src.cli import run_cli


def main(argv=None):
    import numpy as np
    import mindspore as ms
    from src.checkpoint import load_network
    from src.config import enter_output_dir, load_checkpoint_config
    from src.distributed import set_device
    from src.errors import ConfigError, first_line
    from src.factory import build_network

    cfg, config_note = load_checkpoint_config(argv)
    cfg = enter_output_dir(cfg)
    print(config_note, flush=True)
    set_device(cfg.device_target, cfg.device_id, "GRAPH")
    ckpt = cfg.checkpoint_file_path or os.path.join(cfg.output_path, "ckpt", "best.ckpt")
    net = build_network(cfg)
    load_network(net, ckpt)
    net.set_train(False)
    fmt = str(cfg.file_format).upper()
    if fmt not in ("MINDIR", "ONNX", "AIR"):
        raise ConfigError(f"file_format must be MINDIR, ONNX or AIR, got '{cfg.file_format}'")
    name = cfg.file_name or os.path.join(cfg.output_path, f"{cfg.arch}_{cfg.head}")
    os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
    dummy = ms.Tensor(np.zeros((1, 3, cfg.image_size, cfg.image_size), np.uint8))  # the input contract
    try:
        ms.export(net, dummy, file_name=name, file_format=fmt)
    except (RuntimeError, TypeError) as exc:
        first = first_line(exc)
        raise ConfigError(f"MindSpore could not export this network as {fmt} ({first}); MINDIR is supported") from None
    print(f"exported {name}.{fmt.lower()}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
