"""The B-CNN VGG-16 CUB config runs fast-MPN-COV's two-stage recipe (issue 19 item 4), and
classifier_weight_decay reaches the optimizer."""
import os

import mindspore as ms
import numpy as np

from src.config import load_config
from src.factory import param_groups
from src.models import create_model
from tests.helpers import ROOT, make_image_folder, run_script

BCNN_CUB = os.path.join(ROOT, "config", "vgg16_bn_bcnn_cub200_config.yaml")


def test_bcnn_cub_config_is_the_authors_two_stage_recipe():
    """The literals of fast-MPN-COV's finetune/two_stage_finetune.sh (and main.py for VGG classifiers)."""
    c = load_config(["--config_path", BCNN_CUB])
    assert (c.arch, c.head, c.dimension_reduction, c.classifier, c.num_classes) == \
        ("vgg16_bn", "bcnn", 0, "linear", 200)
    assert (c.freeze_backbone_epochs, c.epoch_size, c.lr, c.lr_milestones, c.classifier_lr_factor) == \
        (100, 200, 1e-3, [], 1000.0)
    assert (c.weight_decay, c.classifier_weight_decay, c.momentum, c.batch_size, c.lr_base_batch) == \
        (5e-4, 0.0, 0.9, 10, 10)
    assert (c.image_size, c.train_resize, c.eval_resize, c.eval_flip_average) == (448, 448, 448, True)
    net = create_model("vgg16_bn", "bcnn", 3)
    lr = np.full(4, 1e-3, np.float32)
    decay = {p.name: g["weight_decay"] for g in param_groups(c, net, lr) for p in g["params"]}
    assert decay["fc.weight"] == decay["fc.bias"] == 0.0
    assert decay["features.0.weight"] == 5e-4 and len(decay) == len(net.trainable_params())
    plain = load_config(["--config_path", BCNN_CUB, "--classifier_weight_decay=None"])
    assert {g["weight_decay"] for g in param_groups(plain, net, lr)} == {5e-4}


def test_bcnn_cub_config_trains_the_classifier_then_everything(tmp_path):
    """The config itself through train.py, scaled down: stage 1 (1 epoch) leaves every backbone weight
    as pre-trained and moves the classifier; stage 2 moves the backbone."""
    net = create_model("vgg16_bn", "bcnn", 3)
    start = str(tmp_path / "vgg16_bn.ckpt")
    ms.save_checkpoint(net, start)
    before = {p.name: p.asnumpy() for p in net.trainable_params()}
    data = make_image_folder(str(tmp_path / "data"))
    out = tmp_path / "out"
    tiny = dict(data_path=data, output_path=out, pre_trained=start, num_classes=3, image_size=32, train_resize=32,
                eval_resize=32, device_target="CPU", num_parallel_workers=1, max_steps_per_epoch=1, batch_size=4,
                lr_base_batch=4, epoch_size=2, freeze_backbone_epochs=1, log_interval=1)
    proc = run_script("train.py", [f"--config_path={BCNN_CUB}"] + [f"--{k}={v}" for k, v in tiny.items()],
                      cwd=tmp_path)
    assert "freeze_backbone_epochs=1: epoch 2 trains the backbone too (52 parameters" in proc.stdout
    first = ms.load_checkpoint(str(out / "ckpt" / "epoch_001.ckpt"))
    second = ms.load_checkpoint(str(out / "ckpt" / "epoch_002.ckpt"))
    backbone = [n for n in before if n.startswith("features.")]
    assert len(backbone) == 52  # 13 convolutions' weight and bias, 13 BatchNorms' gamma and beta
    for name in backbone:
        np.testing.assert_array_equal(first[name].asnumpy(), before[name], err_msg=name)
    assert not np.allclose(first["fc.weight"].asnumpy(), before["fc.weight"])
    # a convolution's bias before a BatchNorm in training mode has a zero gradient (the mean is subtracted)
    trained = [n for n in backbone
               if not (n.endswith(".bias") and f"features.{int(n.split('.')[1]) + 1}.gamma" in before)]
    assert len(trained) == 39
    moved = [n for n in trained if not np.array_equal(second[n].asnumpy(), before[n])]
    assert moved == trained, sorted(set(trained) - set(moved))
