"""Evaluate a checkpoint on <data_path>/val: top-1, top-5, loss, parameters and FLOPs.

    python eval.py --checkpoint_file_path=RUN/ckpt/best.ckpt --data_path=/path/to/imagenet
uses the configuration the run saved beside its checkpoint (RUN/ckpt/config.yaml; launch keys such
as run_distribute are not inherited, command-line keys win) and writes RUN/eval_metrics.json;
--config_path=FILE uses FILE instead. With no arguments it evaluates the demo run's best
checkpoint (./output/ckpt/best.ckpt).
"""
import json
import os
import sys

from src.cli import run_cli


def main(argv=None):
    from src.checkpoint import load_network
    from src.config import enter_output_dir, load_checkpoint_config
    from src.data import create_dataset, scan_image_folder, check_class_match
    from src.distributed import init_distributed
    from src.data import shard_samples
    from src.evaluate import EvalNet, evaluate
    from src.ranks import Ranks
    from src.factory import build_network
    from src.models import count_flops, count_params
    from src.run_log import write_json

    cfg, config_note = load_checkpoint_config(argv)
    cfg = enter_output_dir(cfg)
    dist = init_distributed(cfg)
    if dist.is_main:
        print(config_note, flush=True)
    ckpt = cfg.checkpoint_file_path or os.path.join(cfg.output_path, "ckpt", "best.ckpt")
    val_dir = os.path.join(cfg.data_path, "val")
    classes = scan_image_folder(val_dir)
    dataset = create_dataset(val_dir, cfg, False, num_shards=dist.group_size, shard_id=dist.rank)
    saved_classes = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "class_names.json")
    if os.path.isfile(saved_classes):
        with open(saved_classes) as f:
            check_class_match(json.load(f), classes)
    net = build_network(cfg)
    load_network(net, ckpt)
    metrics = evaluate(EvalNet(net, cfg.eval_flip_average), dataset, Ranks(dist), progress=dist.is_main,
                       num_samples=shard_samples(val_dir, classes, dist.rank, dist.group_size))
    flops = count_flops(net, cfg.image_size)
    metrics.update(checkpoint=os.path.abspath(ckpt), params=count_params(net), macs=flops["total"])
    if dist.is_main:
        os.makedirs(cfg.output_path, exist_ok=True)
        write_json(os.path.join(cfg.output_path, "eval_metrics.json"), metrics)
        print(f"{cfg.arch} {cfg.head}: {metrics['params']:,} parameters, {flops['total'] / 1e9:.2f} G multiply-adds "
              f"at {cfg.image_size}x{cfg.image_size}")
        print(f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['num_images']} images, {ckpt})")
        print(f"wrote {os.path.join(cfg.output_path, 'eval_metrics.json')}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
