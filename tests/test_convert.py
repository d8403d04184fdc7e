"""PyTorch checkpoint import: logit parity against the PyTorch twin (bench/peers/torch_resnet.py)
with random weights and random BN statistics, name mapping, and clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import mindspore as ms

from bench.peers.torch_resnet import create_torch_model, randomize_
from src.models import create_model
from src.models.convert import (ConversionError, convert_checkpoint, convert_state_dict, torch_to_ms_name,
                                triu_column_to_row)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "convert_torch_checkpoint.py")


pytestmark = pytest.mark.usefixtures("pynative_mode")


def _torch_model(arch, head, num_classes=1000, seed=0, **kw):
    return randomize_(create_torch_model(arch, head, num_classes, **kw), seed=seed).eval()


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _run_script(*args):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def _ms_logits(ckpt, arch, head, x, num_classes=1000, **kw):
    net = create_model(arch, head, num_classes, **kw)
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(ckpt))
    assert not not_loaded and not unused
    net.set_train(False)
    return net(ms.Tensor(x)).asnumpy()


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _assert_parity(ref, got):
    scale = np.abs(ref).max()
    assert scale > 0.1
    assert np.abs(ref - got).max() < 1e-3 * scale
    assert (ref.argmax(1) == got.argmax(1)).all()


def test_torch_to_ms_name():
    assert torch_to_ms_name("module.conv1.weight") == "conv1.weight"
    assert torch_to_ms_name("bn1.weight") == "bn1.gamma"
    assert torch_to_ms_name("layer2.3.bn3.bias") == "layer2.3.bn3.beta"
    assert torch_to_ms_name("layer1.0.downsample.1.running_mean") == "layer1.0.downsample.1.moving_mean"
    assert torch_to_ms_name("layer1.0.downsample.0.weight") == "layer1.0.downsample.0.weight"
    assert torch_to_ms_name("layer_reduce_bn.running_var") == "layer_reduce_bn.moving_variance"
    assert torch_to_ms_name("layer_reduce.weight") == "layer_reduce.weight"
    assert torch_to_ms_name("fc.weight") == "fc.weight" and torch_to_ms_name("fc.bias") == "fc.bias"
    assert torch_to_ms_name("bn1.num_batches_tracked") is None


@pytest.mark.parametrize("arch,head", [("resnet18", "gap"), ("resnet34", "isqrt_cov"), ("resnet101", "isqrt_cov"),
                                       ("resnet152", "gap")])
def test_every_torch_key_maps_onto_the_network(arch, head):
    """Names and shapes of the PyTorch twin equal the MindSpore network's, one to one."""
    state = _state(create_torch_model(arch, head, 10))
    params = convert_state_dict(state, arch, head, 10, log=lambda *_: None)
    net = create_model(arch, head, 10)
    assert {n: v.shape for n, v in params.items()} == {p.name: tuple(p.shape) for p in net.get_parameters()}


def test_isqrt_resnet50_logit_parity_through_script(tmp_path):
    """fast-MPN-COV layout, bare state_dict, converted by the command-line script."""
    model = _torch_model("resnet50", "isqrt_cov", seed=1)
    src, dst = tmp_path / "mpncovresnet50.pth", tmp_path / "mpncovresnet50.ckpt"
    torch.save(model.state_dict(), src)
    proc = _run_script("--src", str(src), "--dst", str(dst), "--arch", "resnet50", "--head", "isqrt_cov",
                       "--num_classes", "1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--triu_order column" in proc.stdout  # points users of the published weights at the order
    x = np.random.RandomState(0).randn(2, 3, 96, 96).astype(np.float32)
    _assert_parity(_torch_logits(model, x), _ms_logits(str(dst), "resnet50", "isqrt_cov", x))


def test_gap_resnet50_logit_parity_dataparallel_checkpoint(tmp_path):
    """torchvision layout saved under 'state_dict' with DataParallel's 'module.' prefix."""
    model = _torch_model("resnet50", "gap", seed=2)
    src, dst = tmp_path / "resnet50.pth", tmp_path / "resnet50.ckpt"
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": wrapped}, src)
    names = convert_checkpoint(str(src), str(dst), arch="resnet50", head="gap", num_classes=1000,
                               log=lambda *_: None)
    assert "fc.weight" in names and not any(n.startswith("module.") or "num_batches" in n for n in names)
    x = np.random.RandomState(1).randn(2, 3, 64, 64).astype(np.float32)
    _assert_parity(_torch_logits(model, x), _ms_logits(str(dst), "resnet50", "gap", x))


def test_legacy_triu_order_is_permuted(tmp_path):
    """A model trained with fast-MPN-COV's earlier Triuvec (issue #20) gives the same logits only
    after --triu_order column permutes the fc columns."""
    model = _torch_model("resnet18", "isqrt_cov", seed=3, triu_order="column")
    src, dst = tmp_path / "legacy.pth", tmp_path / "legacy.ckpt"
    torch.save(model.state_dict(), src)
    x = np.random.RandomState(2).randn(2, 3, 64, 64).astype(np.float32)
    ref = _torch_logits(model, x)
    convert_checkpoint(str(src), str(dst), arch="resnet18", head="isqrt_cov", triu_order="column",
                       log=lambda *_: None)
    _assert_parity(ref, _ms_logits(str(dst), "resnet18", "isqrt_cov", x))
    convert_checkpoint(str(src), str(dst), arch="resnet18", head="isqrt_cov", log=lambda *_: None)
    wrong = _ms_logits(str(dst), "resnet18", "isqrt_cov", x)
    assert np.abs(ref - wrong).max() > 0.05 * np.abs(ref).max()


def test_triu_permutation_against_explicit_orders():
    d = 5
    rows, cols = np.triu_indices(d)
    column_pairs = [(r, c) for c in range(d) for r in range(c + 1)]
    perm = triu_column_to_row(d)
    assert [column_pairs[k] for k in perm] == list(zip(rows, cols))


def test_wrong_num_classes_fails_clearly(tmp_path):
    model = create_torch_model("resnet18", "gap", 1000)
    src, dst = tmp_path / "r18.pth", tmp_path / "r18.ckpt"
    torch.save(model.state_dict(), src)
    proc = _run_script("--src", str(src), "--dst", str(dst), "--arch", "resnet18", "--head", "gap",
                       "--num_classes", "200")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "fc.weight (1000, 512) != expected (200, 512)" in proc.stderr
    assert "--num_classes 1000" in proc.stderr
    assert not dst.exists()


def test_corrupted_key_set_lists_missing_unexpected_and_misshaped():
    state = _state(create_torch_model("resnet18", "gap", 10))
    del state["layer1.0.conv1.weight"]
    state["layer1.0.conv9.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    state["layer2.0.bn1.running_mean"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state, "resnet18", "gap", 10, log=lambda *_: None)
    msg = str(err.value)
    assert "missing (1): layer1.0.conv1.weight" in msg
    assert "unexpected (1): layer1.0.conv9.weight" in msg
    assert "wrongly shaped (1): layer2.0.bn1.moving_mean (7,) != expected (128,)" in msg


def test_wrong_arch_gives_a_hint():
    state = _state(create_torch_model("resnet18", "gap", 10))
    with pytest.raises(ConversionError, match="pass --arch resnet18"):
        convert_state_dict(state, "resnet34", "gap", 10, log=lambda *_: None)


def test_torchvision_backbone_initialises_isqrt_network(tmp_path):
    """torchvision checkpoint -> iSQRT-COV network: backbone converted, head left to its
    initialisation; the converted backbone reproduces the PyTorch features (at layer4 stride 2)."""
    model = _torch_model("resnet18", "gap", seed=4)
    src, dst = tmp_path / "tv.pth", tmp_path / "tv.ckpt"
    torch.save(model.state_dict(), src)
    notes = []
    names = convert_checkpoint(str(src), str(dst), arch="resnet18", head="isqrt_cov", log=notes.append)
    assert any("backbone only" in n for n in notes)
    assert not any(n.startswith(("fc.", "layer_reduce")) for n in names)
    net = create_model("resnet18", "isqrt_cov", 1000)
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(str(dst)))
    assert sorted(not_loaded) == sorted(p.name for p in net.get_parameters()
                                        if p.name.startswith(("fc.", "layer_reduce")))
    net.set_train(False)
    x = np.random.RandomState(3).randn(1, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(x)).numpy()
    got = net.forward_features(ms.Tensor(x)).asnumpy()
    assert got.shape == (1, 512, 4, 4) and ref.shape == (1, 512, 2, 2)
    stem = create_model("resnet18", "gap", 1000)
    ms.load_param_into_net(stem, ms.load_checkpoint(str(dst)))
    stem.set_train(False)
    _assert_parity(ref.reshape(1, -1), stem.forward_features(ms.Tensor(x)).asnumpy().reshape(1, -1))


class _Payload:
    """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    src = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Payload()}, src)
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_checkpoint(str(src), str(tmp_path / "x.ckpt"), arch="resnet18", head="gap", log=lambda *_: None)
    with pytest.raises(ConversionError, match="no such file"):
        convert_checkpoint(str(tmp_path / "missing.pth"), str(tmp_path / "x.ckpt"), log=lambda *_: None)
