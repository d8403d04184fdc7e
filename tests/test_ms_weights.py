"""MindSpore-native ImageNet weights for --pre_trained (issue 19 item 3): mindcv's ResNets (built
from the installed mindcv 0.3.0) and the model zoo's official/cv/ResNet names."""
import os

import mindspore as ms
import numpy as np
import pytest

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


def test_mindcv_resnet18_finetunes_through_train_py(tmp_path):
    import mindcv
    src = _randomised(mindcv.models.create_model("resnet18", num_classes=1000), seed=3)
    ckpt = str(tmp_path / "mindcv_resnet18.ckpt")
    ms.save_checkpoint(src, ckpt)
    assert detect_ms_layout([p.name for p in src.get_parameters()]) == "mindcv-resnet"
    theirs = {p.name: p.asnumpy() for p in src.get_parameters()}
    data = make_image_folder(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    proc = run_script("train.py", tiny_flags(data, out, pre_trained=ckpt, lr=0, epoch_size=1,
                                             max_steps_per_epoch=1), cwd=tmp_path)
    line = next(x for x in proc.stdout.splitlines() if "initialised from" in x)
    assert "(mindcv-resnet names): 100 parameters loaded; 7 left at initialisation" in line
    assert "fc.bias, fc.weight (another shape in the checkpoint)" in line  # 1000 ImageNet classes vs 3
    trained = ms.load_checkpoint(os.path.join(out, "ckpt", "epoch_001.ckpt"))
    checked = 0
    for name, value in theirs.items():
        if "moving_" in name or name.startswith("classifier."):
            continue  # running statistics move in a training step even at lr 0; 1000-class classifier
        ours = name.replace(".down_sample.", ".downsample.")  # written from mindcv's printed names
        np.testing.assert_array_equal(trained[ours].asnumpy(), value, err_msg=name)
        checked += 1
    assert checked == 60  # 20 convolutions, 20 BatchNorms' gamma and beta


def _zoo_resnet_names(blocks, bottleneck):
    """(model zoo name, this project's name, shape) of official/cv/ResNet/src/resnet.py's resnet18
    (ResidualBlockBase: bn1d/bn2d) or resnet50 (ResidualBlock: bn1-3), written from its published
    structure: stages of in/out channels [64,64,128,256]/[64,128,256,512] (18) or
    [64,256,512,1024]/[256,512,1024,2048] (50), strides 1,2,2,2, a down_sample_layer (1x1 conv, BN)
    when the stride is not 1 or the channels change, end_point a Dense of 1001 classes."""
    def bn(zoo, ours, c):
        return [(f"{zoo}.{f}", f"{ours}.{f}", (c,)) for f in ("gamma", "beta", "moving_mean", "moving_variance")]
    rows = [("conv1.weight", "conv1.weight", (64, 3, 7, 7))] + bn("bn1", "bn1", 64)
    ins, outs = ([64, 256, 512, 1024], [256, 512, 1024, 2048]) if bottleneck else ([64, 64, 128, 256],
                                                                                  [64, 128, 256, 512])
    for s, (n, cin, cout) in enumerate(zip(blocks, ins, outs)):
        for b in range(n):
            p, c_in, stride = f"layer{s + 1}.{b}", (cin if b == 0 else cout), (1 if s == 0 or b else 2)
            if bottleneck:
                mid = cout // 4
                rows += [(f"{p}.conv1.weight", f"{p}.conv1.weight", (mid, c_in, 1, 1))] + bn(f"{p}.bn1", f"{p}.bn1", mid)
                rows += [(f"{p}.conv2.weight", f"{p}.conv2.weight", (mid, mid, 3, 3))] + bn(f"{p}.bn2", f"{p}.bn2", mid)
                rows += [(f"{p}.conv3.weight", f"{p}.conv3.weight", (cout, mid, 1, 1))] + bn(f"{p}.bn3", f"{p}.bn3", cout)
            else:
                rows += [(f"{p}.conv1.weight", f"{p}.conv1.weight", (cout, c_in, 3, 3))] + bn(f"{p}.bn1d", f"{p}.bn1", cout)
                rows += [(f"{p}.conv2.weight", f"{p}.conv2.weight", (cout, cout, 3, 3))] + bn(f"{p}.bn2d", f"{p}.bn2", cout)
            if stride != 1 or c_in != cout:
                rows += [(f"{p}.down_sample_layer.0.weight", f"{p}.downsample.0.weight", (cout, c_in, 1, 1))]
                rows += bn(f"{p}.down_sample_layer.1", f"{p}.downsample.1", cout)
    return rows + [("end_point.weight", "fc.weight", (1001, outs[-1])), ("end_point.bias", "fc.bias", (1001,))]


@pytest.mark.parametrize("arch, blocks, bottleneck", [("resnet18", [2, 2, 2, 2], False),
                                                     ("resnet50", [3, 4, 6, 3], True)])
def test_model_zoo_resnet_names_load(tmp_path, arch, blocks, bottleneck):
    rows = _zoo_resnet_names(blocks, bottleneck)
    rng = np.random.default_rng(1)
    values = {zoo: rng.normal(size=shape).astype(np.float32) for zoo, _, shape in rows}
    # as the model zoo's train.py saves it: the network plus Momentum's moments
    items = [{"name": zoo, "data": ms.Tensor(v)} for zoo, v in values.items()]
    items += [{"name": f"moments.{zoo}", "data": ms.Tensor(np.zeros_like(v))} for zoo, v in values.items()]
    ckpt = str(tmp_path / f"zoo_{arch}.ckpt")
    ms.save_checkpoint(items, ckpt)
    net = create_model(arch, "isqrt_cov", 200, dimension_reduction=16)
    line = load_pretrained(net, ckpt)
    assert "(modelzoo-resnet names)" in line and f"{len(rows) - 2} parameters loaded; 7 left" in line
    ours = {p.name: p.asnumpy() for p in net.get_parameters()}
    for zoo, name, _ in rows[:-2]:
        np.testing.assert_array_equal(ours[name], values[zoo], err_msg=zoo)
    assert len(ours) == len(rows) - 2 + len(HEAD)
