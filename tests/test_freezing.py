"""freeze_layers (issue 19 item 4): the first N backbone stages keep their weights in training."""
import os

import mindspore as ms
import numpy as np
import pytest

from src.errors import ConfigError
from src.freezing import backbone_stages, freeze_layers
from src.models import create_model
from tests.helpers import make_image_folder, run_script, tiny_flags


def test_stages_are_the_published_ones():
    net = create_model("resnet18", "isqrt_cov", 3, dimension_reduction=16)
    firsts = [stage[0].name for stage in backbone_stages(net)]
    assert firsts == ["conv1.weight"] + [f"layer{i}.0.conv1.weight" for i in range(1, 5)]
    vgg = create_model("vgg16_bn", "isqrt_cov", 3, dimension_reduction=16)
    # torchvision vgg16_bn indices: blocks of 2, 2, 3, 3, 3 conv+BN+ReLU, each ended by a max pool
    assert [stage[0].name for stage in backbone_stages(vgg)] == [f"features.{i}.weight" for i in (0, 7, 14, 24, 34)]
    with pytest.raises(ConfigError, match="has 5 backbone stages"):
        freeze_layers(net, 6)


def test_frozen_stages_keep_their_weights_in_train_py(tmp_path):
    net = create_model("resnet18", "isqrt_cov", 3, dimension_reduction=16)
    start = str(tmp_path / "start.ckpt")
    ms.save_checkpoint(net, start)
    before = {p.name: p.asnumpy() for p in net.get_parameters()}
    data = make_image_folder(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    proc = run_script("train.py", tiny_flags(data, out, pre_trained=start, freeze_layers=2, epoch_size=1,
                                             max_steps_per_epoch=2), cwd=tmp_path)
    assert "freeze_layers=2: 25 parameters of the first 2 backbone stages not trained" in proc.stdout
    after = ms.load_checkpoint(os.path.join(out, "ckpt", "epoch_001.ckpt"))
    trained = [n for n in before if "moving_" not in n]
    frozen = [n for n in trained if n.startswith(("conv1.", "bn1.", "layer1."))]
    assert len(frozen) == 15  # 5 convolutions, 5 BNs' gamma and beta
    for name in frozen:
        np.testing.assert_array_equal(after[name].asnumpy(), before[name], err_msg=name)
    for name in ("layer2.0.conv1.weight", "layer4.1.conv2.weight", "layer_reduce.weight", "fc.weight"):
        assert not np.allclose(after[name].asnumpy(), before[name]), name


def test_two_stage_backbone_waits_then_trains_and_resumes_in_either_stage(tmp_path):
    """freeze_backbone_epochs=1 of 3: after epoch 1 the backbone is the initial one and the head has
    moved; after epoch 2 the backbone has moved. A run stopped after epoch 1 (a stage-1 checkpoint: the
    resumed run makes the change) and after epoch 2 (a stage-2 checkpoint: its momentum is kept) and
    resumed gives the uninterrupted run's weights every epoch."""
    net = create_model("resnet18", "isqrt_cov", 3, dimension_reduction=16)
    start = str(tmp_path / "start.ckpt")
    ms.save_checkpoint(net, start)
    before = {p.name: p.asnumpy() for p in net.get_parameters() if "moving_" not in p.name}
    head = {p.name for cell in (net.representation, net.classifier) for p in cell.get_parameters()}
    data = make_image_folder(str(tmp_path / "data"))
    flags = dict(pre_trained=start, freeze_backbone_epochs=1, max_steps_per_epoch=2, keep_checkpoint_max=3,
                 lr_schedule="step", lr_milestones=9,  # a constant lr: the same for any epoch_size
                 train_transform="resize_center_crop", train_resize=32)  # a resumed run draws random crops afresh
    full = str(tmp_path / "full")
    proc = run_script("train.py", tiny_flags(data, full, epoch_size=3, **flags), cwd=tmp_path)
    assert "freeze_backbone_epochs=1: epoch 2 trains the backbone too (60 parameters" in proc.stdout
    epochs = [ms.load_checkpoint(os.path.join(full, "ckpt", f"epoch_{e:03d}.ckpt")) for e in (1, 2, 3)]
    backbone = [n for n in before if n not in head]
    assert len(backbone) == 60
    for name in backbone:
        np.testing.assert_array_equal(epochs[0][name].asnumpy(), before[name], err_msg=name)
    for name in ("layer_reduce.weight", "fc.weight"):
        assert not np.allclose(epochs[0][name].asnumpy(), before[name]), name
    moved = [n for n in backbone if not np.allclose(epochs[1][n].asnumpy(), before[n])]
    assert len(moved) == len(backbone), sorted(set(backbone) - set(moved))

    cut = str(tmp_path / "cut")
    latest = os.path.join(cut, "ckpt", "latest.ckpt")
    for epoch_size in (1, 2, 3):  # then resumed from a stage-1 checkpoint (2), from a stage-2 one (3)
        resume = dict(resume_ckpt=latest) if epoch_size > 1 else {}
        proc = run_script("train.py", tiny_flags(data, cut, epoch_size=epoch_size, **resume, **flags), cwd=tmp_path)
        assert ("epoch 2 trains the backbone too" in proc.stdout) == (epoch_size == 2)
        resumed = ms.load_checkpoint(os.path.join(cut, "ckpt", f"epoch_{epoch_size:03d}.ckpt"))
        for name in before:
            np.testing.assert_allclose(resumed[name].asnumpy(), epochs[epoch_size - 1][name].asnumpy(),
                                       rtol=1e-5, atol=1e-6, err_msg=f"epoch {epoch_size}: {name}")
