"""Checkpoints of DropCov's resnet*_ACD and of iSICE's main.py models: each built as a PyTorch model
with exactly the authors' module names (tests/gcp_torch_models.py), saved as their main.py saves it,
converted by the project's converter (and once by scripts/convert_torch_checkpoint.py), and the
converted network must give the PyTorch model's logits."""
import numpy as np
import pytest
import torch
import mindspore as ms

from bench.peers.torch_resnet import randomize_
from src.dropcov import adaptive_rate
from src.models import count_params, create_model
from src.models.convert import convert_checkpoint
from tests import gcp_torch_models as gm
from tests.test_convert import _run_script
from tests.test_convert_fast_mpn_cov import _assert_parity, _logits, _torch_count, _x

pytestmark = pytest.mark.usefixtures("pynative_mode")


def _converted_logits(dst, arch, head, num_classes, x, torch_model, **kw):
    net = create_model(arch, head, num_classes, **kw)
    assert count_params(net) == _torch_count(torch_model)
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(str(dst)))
    assert not not_loaded and not unused
    net.set_train(False)
    return net(ms.Tensor(x)).asnumpy()


def _dropcov_twin(seed):
    model = randomize_(gm.resnet_acd("resnet18", 10), seed=seed)
    with torch.no_grad():  # randomize_ leaves Conv1d alone: a draw of its own
        model.eca_layer.conv.weight.copy_(torch.randn(1, 1, 3, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def test_dropcov_resnet_acd_checkpoint_gives_its_logits(tmp_path):
    """resnet18_ACD as DropCov's main.py saves it ('module.' on every key, best_acc1 a tensor)."""
    model = _dropcov_twin(1)
    names = set(model.state_dict())
    assert {"layer_reduce.weight", "layer_reduce_bn.running_var", "eca_layer.conv.weight", "fc.weight"} <= names
    src, dst = tmp_path / "r18_acd_best.pth.tar", tmp_path / "dropcov.ckpt"
    torch.save(gm.dropcov_main_py_checkpoint(model, "resnet18_ACD"), src)
    notes = []
    convert_checkpoint(str(src), str(dst), arch="resnet18", head="dropcov", num_classes=10, log=notes.append)
    assert any(n.startswith("layout: DropCov resnet*_ACD") and "'resnet18_ACD'" in n for n in notes), notes
    x = _x(2)
    _assert_parity(_logits(model, x), _converted_logits(dst, "resnet18", "dropcov", 10, x, model))
    # The training-only pieces with the converted weights: ECA weights and the rate (p inside (0, 1)).
    net = create_model("resnet18", "dropcov", 10)
    ms.load_param_into_net(net, ms.load_checkpoint(str(dst)))
    feats = np.maximum(np.random.RandomState(3).randn(2, 256, 4, 4), 0).astype(np.float32)
    with torch.no_grad():
        xe, y = model.eca_layer(torch.from_numpy(feats))
        p = model.rate(xe, y).item()
    rep = net.representation
    y_ms = rep.eca_layer(ms.Tensor(feats))
    np.testing.assert_allclose(y_ms.asnumpy(), y.flatten(1).numpy(), rtol=1e-5, atol=1e-8)
    got = adaptive_rate(y_ms, rep.cov(ms.Tensor(xe.numpy())), rep.rate_coef).asnumpy()[0]
    assert 0 < p < 1 and got == pytest.approx(p, abs=1e-5)


def _two_kinds_of_image(seed, size):
    """White noise and a blocky image: iSICE normalises away contrast and brightness (_x's differences)."""
    rng = np.random.RandomState(seed)
    blocky = np.kron(rng.randn(3, size // 8, size // 8), np.ones((8, 8)))
    return np.stack([rng.randn(3, size, size), blocky]).astype(np.float32)


@pytest.mark.parametrize("arch, size", [("resnet18", 128), ("vgg16_bn", 64)])
def test_isice_main_py_checkpoints_give_their_logits(tmp_path, arch, size):
    """iSICE main.py --representation SICE --pretrained after a step of its AdamW, features in
    DataParallel. Reduction to 8 channels on 4x4 maps: a full-rank covariance, so the partial
    correlations (and the logits) differ from image to image (at 256 channels on a few positions
    the null space's identity-like part dominates every image's output)."""
    model = randomize_(gm.isice_main_py(arch, 7, dim=8), seed=3).eval()
    ckpt = gm.isice_main_py_checkpoint(model, arch)
    keys = set(ckpt["state_dict"])
    assert {"representation.conv_dr_block.0.weight", "classifier.weight", "features.module.0.weight"} <= keys
    src, dst = tmp_path / "model_best.pth.tar", tmp_path / "isice.ckpt"
    torch.save(ckpt, src)
    x = _two_kinds_of_image(4, size)
    with torch.no_grad():
        assert model.representation.conv_dr_block(model.features(torch.from_numpy(x))).shape[2:] == (4, 4)
    notes = []
    convert_checkpoint(str(src), str(dst), arch=arch, head="isice", num_classes=7, dimension_reduction=8,
                       log=notes.append)
    kind = "VGG" if arch == "vgg16_bn" else "ResNet"
    assert any(n.startswith(f"layout: iSICE main.py {kind} + SICE") and "one linear classifier" in n
               for n in notes), notes
    _assert_parity(_logits(model, x), _converted_logits(dst, arch, "isice", 7, x, model, dimension_reduction=8))


def test_script_converts_dropcov_and_points_a_wrong_head_at_it(tmp_path):
    src, dst = tmp_path / "acd.pth", tmp_path / "acd.ckpt"
    torch.save(_dropcov_twin(5).state_dict(), src)
    proc = _run_script("--src", str(src), "--dst", str(dst), "--arch", "resnet18", "--head", "dropcov",
                       "--num_classes", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layout: DropCov resnet*_ACD" in proc.stdout and dst.exists()
    proc = _run_script("--src", str(src), "--dst", str(dst), "--arch", "resnet18", "--head", "isqrt_cov",
                       "--num_classes", "10")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unexpected (1): eca_layer.conv.weight" in proc.stderr and "pass --head dropcov" in proc.stderr
