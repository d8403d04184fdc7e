"""Data-parallel equivalence worker (run by tests/test_distributed.py, alone or under mpirun/msrun).

A BatchNorm-free network (whose result cannot legitimately differ between ranks) takes a few
Momentum steps on a global batch of 8 split over the ranks (and over ACCUMULATION micro-batches
per rank), through the project's own distributed initialisation, dataset sharding, optimizer and
training step; every rank saves its weights.

    python tests/dist_worker.py DATA_PATH OUT_DIR RUN_DISTRIBUTE DEVICE_NUM [ACCUMULATION]
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from src.config import load_config  # noqa: E402
from src.config_schema import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from src.data import create_dataset  # noqa: E402
from src.distributed import exit_process, init_distributed  # noqa: E402
from src.factory import build_optimizer, build_train_step  # noqa: E402
from src.isqrt_cov import ISqrtCov  # noqa: E402
from src.models.preprocess import InputNormalize  # noqa: E402
from src.train_step import micro_batches  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3


class NoBNNet(nn.Cell):
    """features (two stages, as src.freezing.backbone_stages reads a VGG) -> representation ->
    classifier: the layout src.distributed.split_gradient_fusion splits into three all-reduce groups.
    Its input is uint8, as the pipeline delivers it to the project's networks: normalised first."""

    def __init__(self, num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.norm = InputNormalize(mean, std)
        self.features = nn.Cell()
        self.features.features = nn.SequentialCell([nn.Conv2d(3, 6, 3, has_bias=True), nn.ReLU(), nn.MaxPool2d(2, 2),
                                                    nn.Conv2d(6, 6, 3, has_bias=True), nn.ReLU()])
        self.representation = ISqrtCov(6, dimension_reduction=None, iter_num=3)
        self.classifier = nn.Dense(self.representation.output_dim, num_classes)

    def construct(self, x):
        return self.classifier(self.representation(self.features.features(self.norm(x))))


def main(data_path, out_dir, run_distribute, device_num, accumulation=1):
    cfg = load_config([f"--data_path={data_path}", "--demo_dataset=", "--num_classes=3", "--image_size=16",
                       "--eval_resize=16", f"--run_distribute={run_distribute}", f"--device_num={device_num}",
                       "--num_parallel_workers=1", "--weight_decay=0.0001", "--momentum=0.9",
                       f"--grad_accumulation_steps={accumulation}"])
    dist = init_distributed(cfg)
    cfg.batch_size = GLOBAL_BATCH // dist.group_size // accumulation
    ms.set_seed(0)
    net = NoBNNet(cfg.num_classes, cfg.mean, cfg.std)
    data = create_dataset(os.path.join(data_path, "train"), cfg, training=False, num_shards=dist.group_size,
                          shard_id=dist.rank)
    step = build_train_step(cfg, net, build_optimizer(cfg, net, np.full(STEPS, 0.05, np.float32)))
    for i, micro in enumerate(micro_batches(data.epoch(), accumulation)):
        if i == STEPS:
            break
        step.run(micro, ms.Tensor(0.0, ms.float32))
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"rank_{dist.rank}.npz"), **{p.name: p.asnumpy() for p in net.get_parameters()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    exit_process(0)
