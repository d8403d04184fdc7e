"""MindSpore-native ImageNet weights for --pre_trained (issue 19 item 3): mindcv's ResNets (built
from the installed mindcv 0.3.0) and the model zoo's official/cv/ResNet names."""
import json
import os
import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.checkpoint import load_pretrained
from src.models import create_model
from src.models.ms_layouts import detect_ms_layout
from tests.helpers import make_image_folder, run_script, tiny_flags

HEAD = ["fc.bias", "fc.weight", "layer_reduce.weight", "layer_reduce_bn.beta", "layer_reduce_bn.gamma",
        "layer_reduce_bn.moving_mean", "layer_reduce_bn.moving_variance"]


def _randomised(cell, seed):
    rng = np.random.default_rng(seed)
    for p in cell.get_parameters():
        p.set_data(ms.Tensor(rng.normal(0.5, 0.2, p.shape).astype(np.float32)))
    return cell


# resnet50 (bottleneck blocks); mindcv's resnet18 goes through train.py in tests/test_finetune_readme.py
@pytest.mark.parametrize("arch, loaded, trained_params", [("resnet50", 265, 159)])
def test_mindcv_resnet_finetunes_through_train_py(tmp_path, arch, loaded, trained_params):
    """loaded: convolutions + BatchNorms' 4 tensors; trained_params: convolutions + gamma and beta."""
    import mindcv
    src = _randomised(mindcv.models.create_model(arch, num_classes=1000), seed=3)
    ckpt = str(tmp_path / f"mindcv_{arch}.ckpt")
    ms.save_checkpoint(src, ckpt)
    assert detect_ms_layout([p.name for p in src.get_parameters()]) == "mindcv-resnet"
    theirs = {p.name: p.asnumpy() for p in src.get_parameters()}
    data = make_image_folder(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    proc = run_script("train.py", tiny_flags(data, out, arch=arch, pre_trained=ckpt, lr=0, epoch_size=1,
                                             max_steps_per_epoch=1), cwd=tmp_path)
    line = next(x for x in proc.stdout.splitlines() if "initialised from" in x)
    assert f"(mindcv-resnet names): {loaded} parameters loaded; 7 left at initialisation" in line
    assert "fc.bias, fc.weight (another shape in the checkpoint)" in line  # 1000 ImageNet classes vs 3
    trained = ms.load_checkpoint(os.path.join(out, "ckpt", "epoch_001.ckpt"))
    checked = 0
    for name, value in theirs.items():
        if "moving_" in name or name.startswith("classifier."):
            continue  # running statistics move in a training step even at lr 0; 1000-class classifier
        ours = name.replace(".down_sample.", ".downsample.")  # written from mindcv's printed names
        np.testing.assert_array_equal(trained[ours].asnumpy(), value, err_msg=name)
        checked += 1
    assert checked == trained_params


class _ZooBlock(nn.Cell):
    """A residual block with the cell names of the model zoo's ResidualBlockBase (``bn1d``/``bn2d``,
    resnet18/34) or ResidualBlock (``bn1``-``bn3``, resnet50/101/152), in their order."""

    def __init__(self, c_in, c_out, stride, bottleneck):
        super().__init__()
        if bottleneck:
            mid = c_out // 4
            self.conv1, self.bn1 = nn.Conv2d(c_in, mid, 1), nn.BatchNorm2d(mid)
            self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride), nn.BatchNorm2d(mid)
            self.conv3, self.bn3 = nn.Conv2d(mid, c_out, 1), nn.BatchNorm2d(c_out)
        else:
            self.conv1, self.bn1d = nn.Conv2d(c_in, c_out, 3, stride), nn.BatchNorm2d(c_out)
            self.conv2, self.bn2d = nn.Conv2d(c_out, c_out, 3), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.down_sample_layer = None
        if stride != 1 or c_in != c_out:
            self.down_sample_layer = nn.SequentialCell([nn.Conv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out)])


class ZooResNet(nn.Cell):
    """The parameter tree of the model zoo's ``resnet18`` / ``resnet50`` (official/cv/ResNet/src/resnet.py):
    conv1, bn1, layer1-4 of blocks, ``end_point`` a Dense of 1001 classes. Weights only (no construct):
    it is what the zoo's training saves that matters here."""

    def __init__(self, blocks, bottleneck):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2), nn.BatchNorm2d(64)
        ins, outs = ([64, 256, 512, 1024], [256, 512, 1024, 2048]) if bottleneck else \
            ([64, 64, 128, 256], [64, 128, 256, 512])
        for s, (n, c_in, c_out) in enumerate(zip(blocks, ins, outs)):
            layers = [_ZooBlock(c_in if b == 0 else c_out, c_out, 2 if s and not b else 1, bottleneck)
                      for b in range(n)]
            setattr(self, f"layer{s + 1}", nn.SequentialCell(layers))
        self.end_point = nn.Dense(outs[-1], 1001)


def _project_name(zoo_name):
    """This project's name for a model zoo name, written from the two models' printed trees."""
    return re.sub(r"\.bn([12])d\.", r".bn\1.", zoo_name.replace(".down_sample_layer.", ".downsample."))


@pytest.mark.parametrize("arch, blocks, bottleneck", [("resnet18", [2, 2, 2, 2], False),
                                                     ("resnet50", [3, 4, 6, 3], True)])
def test_model_zoo_resnet_cell_loads(tmp_path, arch, blocks, bottleneck):
    zoo = _randomised(ZooResNet(blocks, bottleneck), seed=1)
    names = [[p.name, list(p.shape)] for p in zoo.get_parameters()]
    with open(os.path.join(os.path.dirname(__file__), "data", "modelzoo_resnet_names.json")) as f:
        assert names == json.load(f)[arch]  # exactly the model zoo's names, shapes and order
    values = {p.name: p.asnumpy() for p in zoo.get_parameters()}
    # as the model zoo's train.py saves it: the network plus Momentum's moments
    items = [{"name": n, "data": ms.Tensor(v)} for n, v in values.items()]
    items += [{"name": f"moments.{n}", "data": ms.Tensor(np.zeros_like(v))} for n, v in values.items()]
    ckpt = str(tmp_path / f"zoo_{arch}.ckpt")
    ms.save_checkpoint(items, ckpt)
    net = create_model(arch, "isqrt_cov", 200, dimension_reduction=16)
    line = load_pretrained(net, ckpt)
    backbone = [n for n in values if not n.startswith("end_point.")]
    assert "(modelzoo-resnet names)" in line and f"{len(backbone)} parameters loaded; 7 left" in line
    ours = {p.name: p.asnumpy() for p in net.get_parameters()}
    for name in backbone:
        np.testing.assert_array_equal(ours[_project_name(name)], values[name], err_msg=name)
    assert len(ours) == len(backbone) + len(HEAD)
