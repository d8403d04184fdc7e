"""Checkpoints written by fast-MPN-COV's main.py (Basemodel layout) and VGG-16-BN checkpoints:
each layout is built from a PyTorch model with exactly fast-MPN-COV's / torchvision's module names
(tests/fast_mpn_cov_models.py), converted, and must give the PyTorch model's logits."""
import numpy as np
import pytest
import torch
import mindspore as ms

from bench.peers.torch_resnet import create_torch_model, randomize_
from src.checkpoint import match_network
from src.errors import CheckpointError
from src.models import count_params, create_model
from src.models.convert import ConversionError, convert_checkpoint, convert_state_dict
from src.models.torch_layouts import describe_layout, detect_layout, strip_data_parallel
from tests import fast_mpn_cov_models as fm

pytestmark = pytest.mark.usefixtures("pynative_mode")


def _torch_count(model):
    return sum(p.numel() for p in model.parameters())


def _logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ms_net(params, arch, head, num_classes, **kw):
    net = create_model(arch, head, num_classes, **kw)
    not_loaded, unused = ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in params.items()})
    assert not not_loaded and not unused
    net.set_train(False)
    return net


def _assert_parity(ref, got):
    scale = np.abs(ref).max()
    assert scale > 1e-3
    # the images matter: logits are not the classifier's bias alone (which any backbone would match)
    assert np.abs(ref[0] - ref[1]).max() > 0.1 * scale
    assert np.abs(ref - got).max() < 1e-3 * scale
    assert (ref.argmax(1) == got.argmax(1)).all()


def _x(seed, size=64, batch=2):
    """Images of different contrast and brightness, so that the logits differ from image to image."""
    x = np.random.RandomState(seed).randn(batch, 3, size, size)
    return (x * (1 + 2 * np.arange(batch)).reshape(-1, 1, 1, 1) + np.arange(batch).reshape(-1, 1, 1, 1)).astype(np.float32)


def test_key_layouts_and_data_parallel_prefixes():
    assert strip_data_parallel("module.features.0.weight") == "features.0.weight"
    assert strip_data_parallel("features.module.4.0.conv1.weight") == "features.4.0.conv1.weight"
    assert strip_data_parallel("classifier.weight") == "classifier.weight"
    assert detect_layout(["conv1.weight", "fc.weight"]) == "resnet"
    assert detect_layout(["features.0.weight", "features.4.0.conv1.weight"]) == "basemodel-resnet"
    assert detect_layout(["features.0.weight", "features.1.running_mean", "classifier.weight"]) == "vgg"
    assert detect_layout(["encoder.weight"]) is None
    z = np.zeros((4, 25088), np.float32)
    assert describe_layout("vgg", {"features.0.weight": z, "classifier.0.weight": z}).startswith("torchvision vgg16_bn")


@pytest.mark.parametrize("layout,wrap", [("scratch", "features"), ("finetuned", "model"), ("gavp", None)])
def test_main_py_resnet_checkpoints(tmp_path, layout, wrap):
    """mpncovresnet trained from scratch / finetuned from the published weights, and a GAvP ResNet,
    as main.py saves them (with optimizer state and DataParallel prefixes), give the same logits."""
    head = "gap" if layout == "gavp" else "isqrt_cov"
    ref_net = randomize_(create_torch_model("resnet18", head, 10, dimension_reduction=64), seed=5).eval()
    model = fm.main_py_resnet(ref_net, layout).eval()
    x = _x(1)
    ref = _logits(ref_net, x)
    np.testing.assert_allclose(_logits(model, x), ref, rtol=1e-5, atol=1e-5)  # the regrouping is faithful
    ckpt = fm.main_py_checkpoint(model, "resnet18" if layout == "gavp" else "mpncovresnet18", wrap)
    keys = list(ckpt["state_dict"])
    assert any(k.startswith(("features.", "module.features.")) for k in keys)
    src, dst = tmp_path / "checkpoint.pth.tar", tmp_path / "model.ckpt"
    torch.save(ckpt, src)
    ref = _logits(model, x)  # the checkpoint step ran a train-mode forward: BN statistics moved
    notes = []
    kw = {"dimension_reduction": 64} if head == "isqrt_cov" else {}
    convert_checkpoint(str(src), str(dst), arch="resnet18", head=head, num_classes=10, log=notes.append, **kw)
    expected = {"scratch": "trained from scratch", "finetuned": "finetuned from the published weights",
                "gavp": "without reduction conv"}[layout]
    assert any(n.startswith("layout: fast-MPN-COV main.py ResNet " + expected) for n in notes), notes
    net = create_model("resnet18", head, 10, **kw)
    assert count_params(net) == _torch_count(model)
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(str(dst)))
    assert not not_loaded and not unused
    net.set_train(False)
    _assert_parity(ref, net(ms.Tensor(x)).asnumpy())


def test_main_py_checkpoint_for_another_arch_gives_hint(tmp_path):
    model = fm.main_py_resnet(create_torch_model("resnet18", "isqrt_cov", 10, dimension_reduction=64), "scratch")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="pass --arch resnet18") as err:
        convert_state_dict(state, "resnet34", "isqrt_cov", 10, dimension_reduction=64, log=lambda *_: None,
                           source_arch="mpncovresnet18")
    assert "main.py ResNet trained from scratch" in str(err.value)
    with pytest.raises(ConversionError, match="fit no known layout"):
        convert_state_dict({"encoder.weight": np.zeros(3, np.float32)}, "resnet18", "gap", 10, log=lambda *_: None)


def test_mpncovvgg16_bn_parameter_count_and_logits():
    """The big network: fast-MPN-COV's mpncovvgg16_bn (bare state_dict, its own names) has as many
    parameters as create_model("vgg16_bn", "isqrt_cov", 1000) and converts to the same logits."""
    model = randomize_(fm.mpncovvgg16_bn(1000), seed=2).eval()
    assert _torch_count(model) == 170_479_144
    notes = []
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, "vgg16_bn", "isqrt_cov",
                                1000, log=notes.append)
    assert any("mpncovvgg16_bn" in n and "three-layer classifier" in n for n in notes), notes
    net = _ms_net(params, "vgg16_bn", "isqrt_cov", 1000)
    assert net.classifier_kind == "mlp" and net.classifier_prefix == "classifier."
    assert count_params(net) == _torch_count(model)
    x = _x(3)
    _assert_parity(_logits(model, x), net(ms.Tensor(x)).asnumpy())


def test_main_py_vgg_finetuned_with_linear_classifier(tmp_path):
    """main.py -a mpncovvgg16_bn --pretrained (finetune_mpncovvggd16.sh): features in DataParallel,
    the reduction in representation.conv_dr_block, one nn.Linear 32896 -> classes."""
    model = randomize_(fm.main_py_vgg16_bn(fm.MPNCOV(5, 512, 256), 7, pretrained=True), seed=4).eval()
    ckpt = fm.main_py_checkpoint(model, "mpncovvgg16_bn")
    assert "features.module.0.weight" in ckpt["state_dict"] and "classifier.weight" in ckpt["state_dict"]
    src, dst = tmp_path / "model_best.pth.tar", tmp_path / "cub.ckpt"
    torch.save(ckpt, src)
    x = _x(5)
    ref = _logits(model, x)
    notes = []
    convert_checkpoint(str(src), str(dst), arch="vgg16_bn", head="isqrt_cov", num_classes=7, log=notes.append)
    assert any("one linear classifier" in n and "'mpncovvgg16_bn'" in n for n in notes), notes
    net = create_model("vgg16_bn", "isqrt_cov", 7, classifier="linear")
    assert count_params(net) == _torch_count(model)
    ms.load_param_into_net(net, ms.load_checkpoint(str(dst)), strict_load=True)
    net.set_train(False)
    _assert_parity(ref, net(ms.Tensor(x)).asnumpy())
    # Asked for the MLP, the linear classifier cannot convert: the rest does, with a note.
    notes = []
    names = convert_checkpoint(str(src), str(dst), arch="vgg16_bn", head="isqrt_cov", num_classes=7,
                               classifier="mlp", log=notes.append)
    assert any("classifier left out" in n for n in notes) and not any(n.startswith("fc.") for n in names)
    assert "layer_reduce.weight" in names and "features.40.weight" in names


def test_main_py_vgg_gavp_from_scratch_has_mlp_classifier():
    """main.py -a vgg16_bn --representation GAvP without --pretrained keeps VGG's MLP (512 -> 4096)."""
    model = randomize_(fm.main_py_vgg16_bn(fm.GAvP(512), 5, pretrained=False), seed=6).eval()
    state = {"module." + k: v.numpy() for k, v in model.state_dict().items()}
    params = convert_state_dict(state, "vgg16_bn", "gap", 5, log=lambda *_: None)
    net = _ms_net(params, "vgg16_bn", "gap", 5, classifier="mlp")
    assert count_params(net) == _torch_count(model)
    x = _x(7, size=48)
    _assert_parity(_logits(model, x), net(ms.Tensor(x)).asnumpy())


def test_torchvision_vgg16_bn_gives_the_backbone():
    """torchvision's vgg16_bn (classifier after a 7x7 pool, 25088 inputs) initialises the backbone of
    any head; its features reproduce torchvision's conv features (without the last max-pool)."""
    features = randomize_(fm.vgg_features(), seed=8).eval()
    state = {f"features.{k}": v.numpy() for k, v in features.state_dict().items()}
    for i, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))):  # names and shapes only
        state[f"classifier.{i}.weight"] = np.zeros(shape, np.float32)
        state[f"classifier.{i}.bias"] = np.zeros(shape[:1], np.float32)
    notes = []
    params = convert_state_dict(state, "vgg16_bn", "isqrt_cov", 200, log=notes.append)
    assert any(n.startswith("layout: torchvision vgg16_bn") for n in notes)
    assert any("backbone only" in n for n in notes)
    assert all(n.startswith("features.") for n in params) and len(params) == 13 * 6
    net = create_model("vgg16_bn", "gap", 200)
    ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in params.items()})
    net.set_train(False)
    x = _x(9, size=32)
    with torch.no_grad():
        ref = features[:-1](torch.from_numpy(x)).numpy()
    got = net.forward_features(ms.Tensor(x)).asnumpy()
    assert got.shape == ref.shape == (2, 512, 2, 2)
    _assert_parity(ref.reshape(2, -1), got.reshape(2, -1))


def test_finetuning_skips_a_classifier_of_the_other_kind():
    """--pre_trained of an ImageNet MLP checkpoint into a linear-classifier network (CUB finetuning)."""
    net = create_model("vgg16_bn", "gap", 3, classifier="linear")
    params = {p.name: p.asnumpy() for p in net.get_parameters() if not p.name.startswith("fc.")}
    params.update({"classifier.0.weight": np.zeros((4096, 512), np.float32), "classifier.6.bias": np.zeros(1000)})
    chosen, left = match_network(net, params, "x.ckpt", pre_trained=True)
    assert sorted(left) == ["fc.bias", "fc.weight"]  # the new classifier; the MLP's entries are not needed
    assert len(chosen) == len(params) - 2
    with pytest.raises(CheckpointError, match="unexpected 2: classifier.0.weight, classifier.6.bias"):
        match_network(net, params, "x.ckpt")  # outside finetuning, a checkpoint of another network


class _ScaledPool(ms.nn.Cell):
    """A representation with a fixed, non-trainable parameter, as CBP's sketch hashes: fast-MPN-COV
    keeps such values outside its state_dict."""

    def __init__(self, in_channels, reproduce=False):
        super().__init__()
        self.output_dim = in_channels
        self.pool_scale = ms.Parameter(ms.Tensor(np.full(in_channels, 2.0, np.float32)), name="pool_scale",
                                       requires_grad=False)
        if reproduce:
            self.fast_mpn_cov_params = lambda: {"pool_scale": np.full(in_channels, 3.0, np.float32)}

    def construct(self, x):
        return x.mean(axis=(2, 3)) * self.pool_scale


def _scaled_pool(in_channels, reproduce=False):
    return _ScaledPool(in_channels, reproduce)


@pytest.mark.parametrize("reproduce", [False, True])
def test_fixed_representation_parameters_fast_mpn_cov_does_not_save(monkeypatch, reproduce):
    from src.models import HEADS
    monkeypatch.setitem(HEADS, "scaled_gap", (_scaled_pool, {"reproduce": reproduce}, 2))
    model = fm.main_py_resnet(create_torch_model("resnet18", "gap", 10), "gavp")
    notes = []
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, "resnet18", "scaled_gap",
                                10, log=notes.append)
    assert params["pool_scale"].tolist() == [3.0 if reproduce else 2.0] * 512
    assert any(("drawn as fast-MPN-COV" if reproduce else "taken from the network as built") in n for n in notes)
    _ms_net(params, "resnet18", "scaled_gap", 10)  # every parameter present, none unexpected


def test_script_names_the_layout_and_refuses_vgg_without_bn(tmp_path):
    """Through scripts/convert_torch_checkpoint.py: a main.py GAvP ResNet checkpoint converts and the
    layout is printed; a VGG-16 without BN stops with exit code 2 and a one-line cause."""
    from tests.test_convert import _run_script
    model = fm.main_py_resnet(create_torch_model("resnet18", "gap", 4), "gavp")
    src, dst = tmp_path / "checkpoint.pth.tar", tmp_path / "r18.ckpt"
    torch.save(fm.main_py_checkpoint(model, "resnet18"), src)
    proc = _run_script("--src", str(src), "--dst", str(dst), "--arch", "resnet18", "--head", "gap", "--num_classes", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layout: fast-MPN-COV main.py ResNet without reduction conv" in proc.stdout and dst.exists()
    plain = torch.nn.Sequential(*[m for m in fm.vgg_features() if not isinstance(m, torch.nn.BatchNorm2d)])
    torch.save({"features." + k: v for k, v in plain.state_dict().items()}, src)
    proc = _run_script("--src", str(src), "--dst", str(dst), "--arch", "vgg16_bn", "--head", "gap")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no batch normalisation; this project has vgg16_bn only" in proc.stderr
