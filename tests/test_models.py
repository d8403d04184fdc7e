"""Networks of src.models: shapes, names, parameter counts, FLOPs, initialisation, graph mode."""
import numpy as np
import pytest
import mindspore as ms

from src.config import load_config
from src.factory import build_optimizer, build_train_step
from src.models import ARCHS, HEADS, count_flops, count_params, create_model
from src.isqrt_cov import num_products
from src.models.resnet import batch_norm


pytestmark = pytest.mark.usefixtures("pynative_mode")


def _input(batch, size, seed=0):
    return ms.Tensor(np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32))


# every head on every small backbone; the two big ResNets (slow to build) with one stride-1 and one stride-2 head
SHAPE_CASES = [(h, a) for h in sorted(HEADS) for a in sorted(ARCHS) if a not in ("resnet101", "resnet152")] + \
    [(h, a) for h in ("gap", "isqrt_cov") for a in ("resnet101", "resnet152")]


@pytest.mark.parametrize("head, arch", SHAPE_CASES)
def test_output_shapes(arch, head):
    big = arch in ("resnet101", "resnet152")
    batch, size = (1, 32) if big else (2, 64)
    # one linear classifier everywhere: the VGG MLP (134 M parameters) is built once, in test_convert_fast_mpn_cov
    net = create_model(arch, head, 7, classifier="linear", **({"iter_num": 3} if head == "isqrt_cov" else {}))
    net.set_train(False)
    x = _input(batch, size)
    f = net.forward_features(x)
    channels = {"resnet18": 512, "resnet34": 512, "vgg16_bn": 512}.get(arch, 2048)
    # ResNet layer4 keeps stride 1 for iSQRT-COV and DropCov (/16), 2 for GAP, B-CNN, CBP (as fast-MPN-COV)
    # and iSICE (as its authors' torchvision backbones) (/32); VGG drops its last pool for every head (/16)
    side = size // 16 if head in ("isqrt_cov", "dropcov") or arch == "vgg16_bn" else size // 32
    assert f.shape == (batch, channels, side, side) and net.features.out_channels == channels
    rep = net.representation(f)
    expected_dim = {"isqrt_cov": 256 * 257 // 2, "gap": channels, "bcnn": channels * channels, "cbp": 8192,
                    "dropcov": 256 * 257 // 2, "isice": 256 * 257 // 2}[head]
    assert net.representation.output_dim == expected_dim
    assert rep.shape == (batch, expected_dim)
    logits = net(x)
    assert logits.shape == (batch, 7)
    assert np.isfinite(logits.asnumpy()).all()
    np.testing.assert_allclose(net.forward_head(f).asnumpy(), logits.asnumpy(), rtol=1e-5, atol=1e-6)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="resnet101.*resnet152.*resnet18.*resnet34.*resnet50.*vgg16_bn"):
        create_model("resnet42", "gap", 10)
    with pytest.raises(ValueError, match="gap.*isqrt_cov"):
        create_model("resnet18", "bilinear", 10)
    with pytest.raises(ValueError, match="dimension_reduction.*is_sqrt.*is_vec.*iter_num"):
        create_model("resnet18", "isqrt_cov", 10, iter_number=5)
    with pytest.raises(ValueError, match="none"):
        create_model("resnet18", "gap", 10, iter_num=5)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", "gap", 0)
    with pytest.raises(ValueError, match="auto, linear, mlp"):
        create_model("resnet18", "gap", 10, classifier="svm")


def test_parameter_names_follow_torchvision_layout():
    net = create_model("resnet50", "isqrt_cov", 10)
    names = [p.name for p in net.get_parameters()]
    for name in ["conv1.weight", "bn1.gamma", "bn1.beta", "bn1.moving_mean", "bn1.moving_variance",
                 "layer1.0.conv1.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.gamma",
                 "layer3.5.bn3.moving_variance", "layer4.0.downsample.1.beta", "layer4.2.bn3.gamma",
                 "layer_reduce.weight", "layer_reduce_bn.moving_mean", "fc.weight", "fc.bias"]:
        assert name in names
    assert len(names) == len(set(names))
    assert not any(n.startswith(("features.", "representation.", "classifier.")) for n in names)
    # The classifier is exactly what classifier_prefix selects.
    fc_names = {p.name for p in net.classifier.get_parameters()}
    assert fc_names == {n for n in names if n.startswith(net.classifier_prefix)} == {"fc.weight", "fc.bias"}
    # The isqrt ResNet's layer4 has no stride anywhere, the GAP one strides in block 0.
    assert net.features.layer4[0].conv2.stride == (1, 1)
    assert net.features.layer4[0].downsample[0].stride == (1, 1)
    gap = create_model("resnet50", "gap", 10)
    assert gap.features.layer4[0].conv2.stride == (2, 2)
    assert gap.features.layer4[0].conv1.stride == (1, 1)  # v1.5: stride on the 3x3 conv


def test_parameter_counts_exact():
    assert count_params(create_model("resnet50", "isqrt_cov", 1000)) == 56_929_832
    assert count_params(create_model("resnet50", "gap", 1000)) == 25_557_032
    # torchvision's published counts for the other GAP ResNets
    assert count_params(create_model("resnet18", "gap", 1000)) == 11_689_512
    assert count_params(create_model("resnet34", "gap", 1000)) == 21_797_672
    # iSQRT-COV adds the 1x1 reduction (C*256 + BN 512) and swaps fc (C+1)*1000 for (32896+1)*1000
    c = 512
    assert count_params(create_model("resnet18", "isqrt_cov", 1000)) == \
        11_689_512 - (c + 1) * 1000 + c * 256 + 512 + 32_897 * 1000


def test_flops_resnet50():
    gap = create_model("resnet50", "gap", 1000)
    moving = gap.features.bn1.moving_mean.asnumpy().copy()
    gap.set_train(True)
    f = count_flops(gap, 224)
    assert abs(f["conv_fc"] / 4.09e9 - 1) < 0.02  # torchvision's 4.09 GFLOPS (multiply-adds)
    assert f["meta"] == 0 and f["total"] == f["conv_fc"]
    # the measurement left mode, train flag and BN statistics as they were
    assert ms.get_context("mode") == ms.PYNATIVE_MODE and gap.training
    np.testing.assert_array_equal(gap.features.bn1.moving_mean.asnumpy(), moving)

    isqrt = create_model("resnet50", "isqrt_cov", 1000)
    f = count_flops(isqrt, 224)
    assert abs(f["conv_fc"] / 6.34e9 - 1) < 0.02
    # covariance of 196 features in 256-d plus 12 Newton-Schulz products of 256^3
    assert num_products(5) == 12
    assert f["meta"] == 256 * 256 * 196 + 12 * 256 ** 3
    assert abs(f["meta"] / 0.214e9 - 1) < 0.02
    assert f["total"] == f["conv_fc"] + f["meta"]


def test_flops_scale_with_image_size():
    net = create_model("resnet18", "gap", 10)
    small, big = count_flops(net, 128)["conv_fc"], count_flops(net, (256, 256))["conv_fc"]
    fc = 512 * 10
    assert abs((big - fc) / (small - fc) - 4) < 1e-6  # convolutions scale with the pixel count


def test_initialisation_as_reference():
    net = create_model("resnet34", "isqrt_cov", 100)
    w = net.features.layer3[0].conv2.weight.asnumpy()  # 256 x 256 x 3 x 3, fan_out = 2304
    assert abs(w.std() / np.sqrt(2.0 / (256 * 9)) - 1) < 0.02 and abs(w.mean()) < 1e-3
    w = net.representation.layer_reduce.weight.asnumpy()  # 256 x 512 x 1 x 1, fan_out = 256
    assert abs(w.std() / np.sqrt(2.0 / 256) - 1) < 0.02
    for bn in (net.features.bn1, net.features.layer2[1].bn2, net.representation.layer_reduce_bn):
        assert (bn.gamma.asnumpy() == 1).all() and (bn.beta.asnumpy() == 0).all()
        assert bn.eps == pytest.approx(1e-5)
    fc = net.classifier.fc.weight.asnumpy()  # PyTorch Linear default: U(+-1/sqrt(in))
    bound = 1 / np.sqrt(32896)
    assert np.abs(fc).max() <= bound and fc.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)


def test_batch_norm_momentum_as_pytorch():
    """moving = 0.9 moving + 0.1 batch statistic (PyTorch momentum 0.1), unbiased variance."""
    bn = batch_norm(3)
    bn.set_train(True)
    x = np.random.RandomState(2).randn(4, 3, 5, 5).astype(np.float32) * 2 + 1
    bn(ms.Tensor(x))
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.moving_mean.asnumpy(), 0.1 * mean, rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.asnumpy(), 0.9 + 0.1 * var, rtol=1e-4)


def _project_step(net, num_classes, lr):
    """The project's training step and optimizer (float32, label smoothing off, plain SGD)."""
    cfg = load_config([f"--num_classes={num_classes}", "--amp_level=O0", "--momentum=0", "--weight_decay=0",
                       "--label_smoothing=0"])
    return build_train_step(cfg, net, build_optimizer(cfg, net, np.full(8, lr, np.float32)))


def _train_step(step, x, y):
    loss, control = step(x, y, ms.Tensor(0.0, ms.float32))
    assert control.asnumpy()[0] == 0  # applied, not skipped
    return loss


def test_graph_mode_train_step():
    """The training mode: the project's compiled step of the iSQRT-COV ResNet-18 lowers the loss."""
    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model("resnet18", "isqrt_cov", 4, iter_num=3)
    step = _project_step(net, 4, 0.05)
    x, y = _input(4, 64, seed=1), ms.Tensor(np.array([0, 1, 2, 3], np.int32))
    first = float(_train_step(step, x, y).asnumpy())
    for _ in range(3):
        last = float(_train_step(step, x, y).asnumpy())
    assert np.isfinite(first) and np.isfinite(last) and last < first


def _vgg16_conv_macs(size):
    """Multiply-adds of VGG-16's 13 3x3 convolutions at size x size (its last max-pool removed)."""
    macs, side, cin = 0, size, 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            side //= 2
        else:
            macs += side * side * cin * v * 9
            cin = v
    return macs


def test_vgg16_bn_classifiers_names_and_flops():
    from src.models.network import resolve_classifier
    assert resolve_classifier("vgg16_bn", "isqrt_cov") == "mlp"  # mpncovvgg16_bn
    assert resolve_classifier("vgg16_bn", "gap") == resolve_classifier("resnet50", "isqrt_cov") == "linear"
    assert resolve_classifier("vgg16_bn", "isqrt_cov", "linear") == "linear"
    net = create_model("vgg16_bn", "isqrt_cov", 10, classifier="linear")
    names = [p.name for p in net.get_parameters()]
    assert names[:6] == ["features.0.weight", "features.0.bias", "features.1.moving_mean",
                         "features.1.moving_variance", "features.1.gamma", "features.1.beta"]
    assert "features.40.weight" in names and "features.43.weight" not in names  # last conv; no last pool
    assert net.classifier_prefix == "fc." and {n for n in names if n.startswith("fc.")} == {"fc.weight", "fc.bias"}
    f = count_flops(net, 224)
    assert f["conv_fc"] == _vgg16_conv_macs(224) + 512 * 256 * 14 * 14 + 32896 * 10
    assert f["meta"] == 256 * 256 * 196 + 12 * 256 ** 3
    gap = create_model("vgg16_bn", "gap", 10, classifier="mlp")
    cls = [p.name for p in gap.get_parameters() if p.name.startswith(gap.classifier_prefix)]
    assert gap.classifier_prefix == "classifier." and len(cls) == 6
    assert tuple(gap.classifier.classifier[0].weight.shape) == (4096, 512)
    w = gap.classifier.classifier[3].weight.asnumpy()  # VGG's N(0, 0.01)
    assert abs(w.std() / 0.01 - 1) < 0.02 and (gap.classifier.classifier[6].bias.asnumpy() == 0).all()
    f = count_flops(gap, 448)
    assert f["conv_fc"] == _vgg16_conv_macs(448) + 512 * 4096 + 4096 * 4096 + 4096 * 10 and f["meta"] == 0
    # torchvision's published 15.47 GFLOPS of vgg16_bn: the same convolutions plus its 25088-input classifier
    assert abs((_vgg16_conv_macs(224) + 25088 * 4096 + 4096 * 4096 + 4096 * 1000) / 15.47e9 - 1) < 0.005


def test_graph_mode_train_step_vgg_mlp():
    """GRAPH mode with the MLP classifier (dropout active in training): finite loss, weights move."""
    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model("vgg16_bn", "gap", 3, classifier="mlp")
    step = _project_step(net, 3, 0.01)
    before = net.classifier.classifier[0].weight.asnumpy().copy()
    loss = float(_train_step(step, _input(2, 32, seed=2), ms.Tensor(np.array([0, 2], np.int32))).asnumpy())
    assert np.isfinite(loss) and not np.array_equal(net.classifier.classifier[0].weight.asnumpy(), before)
