"""The B-CNN VGG-16 CUB config runs fast-MPN-COV's two-stage recipe (issue 19 item 4), and
classifier_weight_decay reaches the optimizer."""
import os
import shlex

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


def _config_commands(path):
    """The train.py command lines written in a config's header comment."""
    with open(path) as f:
        return [line.lstrip("# ").strip() for line in f if line.startswith("#   python train.py")]


def test_bcnn_cub_config_two_commands_train_the_classifier_then_everything(tmp_path):
    """The config's two commands (stage 1 at the authors' batch 40, then a resume at batch 10), scaled
    down (1 + 1 epochs, batches 4 then 2): stage 1 leaves every backbone weight as pre-trained and moves
    the classifier; the resumed stage 2 moves the backbone."""
    net = create_model("vgg16_bn", "bcnn", 3)
    start = str(tmp_path / "vgg16_bn.ckpt")
    ms.save_checkpoint(net, start)
    before = {p.name: p.asnumpy() for p in net.trainable_params()}
    data = make_image_folder(str(tmp_path / "data"))
    stage1, stage2 = _config_commands(BCNN_CUB)
    assert "--batch_size=40 --lr_base_batch=40 --epoch_size=100" in stage1 and "--resume_ckpt=" in stage2
    tiny = dict(pre_trained=start, num_classes=3, image_size=32, train_resize=32, eval_resize=32, device_target="CPU",
                num_parallel_workers=1, max_steps_per_epoch=1, freeze_backbone_epochs=1, log_interval=1)
    for command, sizes in ((stage1, dict(batch_size=4, lr_base_batch=4, epoch_size=1)),
                           (stage2, dict(batch_size=2, lr_base_batch=2, epoch_size=2))):
        argv = shlex.split(command.replace("config/", os.path.join(ROOT, "config") + "/").replace("=CUB", f"={data}"))
        assert argv[:2] == ["python", "train.py"]
        proc = run_script("train.py", argv[2:] + [f"--{k}={v}" for k, v in dict(tiny, **sizes).items()], cwd=tmp_path)
    assert "freeze_backbone_epochs=1: epoch 2 trains the backbone too (52 parameters" in proc.stdout
    assert f"resumed from {tmp_path}/output/ckpt/latest.ckpt at epoch 2 step 0" in proc.stdout
    first = ms.load_checkpoint(str(tmp_path / "output" / "ckpt" / "epoch_001.ckpt"))
    second = ms.load_checkpoint(str(tmp_path / "output" / "ckpt" / "epoch_002.ckpt"))
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
