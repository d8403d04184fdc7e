"""Evaluate a checkpoint on <data_path>/<val_split>: top-1, top-5, loss, parameters and FLOPs.

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
    from src.data import (FileList, FolderPipeline, bad_image_lines, check_class_match, check_lists,
                          scan_image_folder, split_dir, split_verdicts)
    from src.distributed import init_distributed, local_rank_count
    from src.evaluate import EvalNet, evaluate
    from src.ranks import Ranks
    from src.factory import build_network
    from src.models import count_flops, count_params
    from src.run_log import write_json

    cfg, config_note = load_checkpoint_config(argv)
    cfg = enter_output_dir(cfg)
    dist = init_distributed(cfg)
    ranks = Ranks(dist)
    if dist.is_main:
        print(config_note, flush=True)
    ckpt = cfg.checkpoint_file_path or os.path.join(cfg.output_path, "ckpt", "best.ckpt")
    val_dir = split_dir(cfg, "val_split")
    files = FileList(val_dir, scan_image_folder(val_dir))
    bad, = split_verdicts([files], ranks.sum(check_lists([files], (dist.rank, dist.group_size))))
    for line in bad_image_lines(files, bad, cfg.bad_image_mode):
        if dist.is_main:
            print(line, file=sys.stderr)
    dataset = FolderPipeline(files, cfg, False, bad, dist.group_size, dist.rank, local_ranks=local_rank_count())
    saved_classes = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "class_names.json")
    if os.path.isfile(saved_classes):
        with open(saved_classes) as f:
            check_class_match(json.load(f), files.classes, "the checkpoint's classes", val_dir)
    net = build_network(cfg)
    load_network(net, ckpt)
    metrics = evaluate(EvalNet(net, cfg.eval_flip_average), dataset, ranks, progress=dist.is_main,
                       num_samples=dataset.num_samples)
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
