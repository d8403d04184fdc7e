"""Tests of the B-CNN and compact bilinear pooling heads (src/bilinear.py) against independent references.

References written here in float64 NumPy: B-CNN from its definition; the Tensor Sketch both as
NumPy FFTs of count sketches (what fast-MPN-COV computes per position) and as the count sketch of
every outer product x x^T with the combined hash (the definition the FFT computes); central
finite differences of these for the gradients. Forward and backward run in GRAPH_MODE, as in training.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from bench.meta_layer import FwdBwd  # (<net(x), dout>, its gradient w.r.t. x) in one graph
from src.bilinear import BCNN, CBP, sketch_hashes, torch_cbp_hashes
from src.checkpoint import load_network, save_atomic
from src.config import load_config
from src.errors import CheckpointError
from src.factory import build_network, build_optimizer, build_train_step, head_kwargs
from src.models import count_flops, create_model


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


# ---------------------------------------------------------------- float64 NumPy references

def np_signed_sqrt_l2(z, thresh=1e-8):
    z = np.sign(z) * np.sqrt(np.abs(z) + thresh)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def np_bcnn(x):
    b, c, h, w = x.shape
    xr = x.reshape(b, c, h * w)
    sigma = xr @ xr.transpose(0, 2, 1) / (h * w)
    return np_signed_sqrt_l2(sigma.reshape(b, c * c))


def np_count_sketch(v, index, sign, d):
    """Count sketch of the rows of v (N, C): out[n, index[c]] += sign[c] v[n, c]."""
    out = np.zeros((v.shape[0], d))
    for c in range(v.shape[1]):
        out[:, index[c]] += sign[c] * v[:, c]
    return out


def np_tensor_sketch_fft(x, index, sign, d):
    """Per image: sum over positions of ifft(fft(CS_0(x_m)) * fft(CS_1(x_m))), before the normalisation."""
    b, c, h, w = x.shape
    out = np.zeros((b, d))
    for i in range(b):
        v = x[i].reshape(c, h * w).T
        f0 = np.fft.fft(np_count_sketch(v, index[0], sign[0], d), axis=1)
        f1 = np.fft.fft(np_count_sketch(v, index[1], sign[1], d), axis=1)
        out[i] = np.real(np.fft.ifft(f0 * f1, axis=1)).sum(axis=0)
    return out


def np_tensor_sketch_outer(x, index, sign, d):
    """The same quantity from its definition: every entry (i, j) of sum_m x_m x_m^T goes to bin
    (h_0(i) + h_1(j)) mod d with sign s_0(i) s_1(j)."""
    b, c, h, w = x.shape
    xr = x.reshape(b, c, h * w)
    g = xr @ xr.transpose(0, 2, 1)
    out = np.zeros((b, d))
    for i in range(c):
        for j in range(c):
            out[:, (index[0, i] + index[1, j]) % d] += sign[0, i] * sign[1, j] * g[:, i, j]
    return out


def np_cbp(x, index, sign, d):
    return np_signed_sqrt_l2(np_tensor_sketch_fft(x, index, sign, d))


def finite_difference(f, x, dout, eps=1e-6):
    """d <f(x), dout> / dx by central differences in float64."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for k in range(flat.size):
        keep = flat[k]
        flat[k] = keep + eps
        up = (f(x) * dout).sum()
        flat[k] = keep - eps
        down = (f(x) * dout).sum()
        flat[k] = keep
        gflat[k] = (up - down) / (2 * eps)
    return g


def _features(shape, seed=0):
    # Post-ReLU-like: non-negative with exact zeros, as the heads see them.
    return np.maximum(np.random.default_rng(seed).standard_normal(shape), 0) + 0.05


# ---------------------------------------------------------------- the references agree

def test_numpy_tensor_sketch_fft_equals_outer_product_definition():
    x = _features((2, 5, 3, 2))
    index, sign = sketch_hashes(5, 7, seed=3)
    np.testing.assert_allclose(np_tensor_sketch_fft(x, index, sign, 7), np_tensor_sketch_outer(x, index, sign, 7),
                               rtol=1e-10, atol=1e-10)


def test_tensor_sketch_inner_product_is_unbiased_for_squared_inner_product():
    # Gao et al.: <TS(x), TS(y)> estimates <x, y>^2 without bias over random hashes and signs.
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 1, 6, 1, 1))
    est = []
    for seed in range(400):
        index, sign = sketch_hashes(6, 16, seed)
        est.append((np_tensor_sketch_fft(x, index, sign, 16) * np_tensor_sketch_fft(y, index, sign, 16)).sum())
    est = np.array(est)
    exact = float((x.ravel() @ y.ravel()) ** 2)
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est))
    assert est.std() > 0  # the sketches do vary with the seed


def test_sketch_hashes_ranges_and_seed():
    index, sign = sketch_hashes(512, 8192, seed=1)
    assert index.shape == sign.shape == (2, 512) and index.dtype == np.int32
    assert index.min() >= 0 and index.max() < 8192 and set(np.unique(sign)) == {-1.0, 1.0}
    again, _ = sketch_hashes(512, 8192, seed=1)
    other, _ = sketch_hashes(512, 8192, seed=2)
    np.testing.assert_array_equal(index, again)
    assert (index != other).any()


# ---------------------------------------------------------------- forward and backward

def _fft_with_size(head):
    # The GPU's FFT operator (FFTWithSize), here on its CPU kernel: the GPU code path's arithmetic.
    head.fft_with_size = True
    return head


HEADS = {
    "bcnn": (lambda c: BCNN(c), lambda x, head: np_bcnn(x)),
    # proj_dim 10: every one of its bins receives some channel pair (checked in the test); an empty
    # bin is exactly 0 by definition but FFT round-off there (~1e-7) becomes ~3e-4 after the
    # signed square root, in NumPy's float64 FFT and any float32 one alike.
    "cbp_fft": (lambda c: CBP(c, 10, method="fft"),
                lambda x, head: np_cbp(x, head.sketch_index.asnumpy(), head.sketch_sign.asnumpy(), 10)),
    "cbp_fft_with_size": (lambda c: _fft_with_size(CBP(c, 10, method="fft")),
                          lambda x, head: np_cbp(x, head.sketch_index.asnumpy(), head.sketch_sign.asnumpy(), 10)),
    "cbp_gram": (lambda c: CBP(c, 10, method="gram"),
                 lambda x, head: np_cbp(x, head.sketch_index.asnumpy(), head.sketch_sign.asnumpy(), 10)),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_forward_and_gradient_match_numpy(name):
    build, ref = HEADS[name]
    head = build(6)
    if isinstance(head, CBP):
        index = head.sketch_index.asnumpy()
        assert len({(i + j) % 10 for i in index[0] for j in index[1]}) == 10
    # The signed square root has slope 1 / (2 sqrt(|z| + 1e-8)): float32 rounding of a sketch bin
    # that cancels to ~0 is amplified to ~1e-4 in any implementation. Take features whose bins are
    # all away from 0 (seed chosen here, deterministically), so the comparison is tight.
    for seed in range(2, 100):
        x = _features((2, 6, 3, 4), seed=seed)
        raw = ref(x, head) ** 2
        if raw.min() > 1e-3 * raw.max():
            break
    out = head(Tensor(x.astype(np.float32))).asnumpy()
    expected = ref(x, head)
    assert out.shape == (2, head.output_dim) == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=5e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)

    dout = np.random.default_rng(3).standard_normal(expected.shape)
    loss, grad = FwdBwd(head)(Tensor(x.astype(np.float32)), Tensor(dout.astype(np.float32)))
    fd = finite_difference(lambda v: ref(v, head), x.copy(), dout)
    np.testing.assert_allclose(loss.asnumpy(), (expected * dout).sum(), rtol=1e-4)
    np.testing.assert_allclose(grad.asnumpy(), fd, rtol=2e-3, atol=2e-5 * np.abs(fd).max())


def _torch_fast_mpn_cov_cbp(x, index, sign, d):
    """fast-MPN-COV's CBP.forward in PyTorch, its removed torch.fft(x, 1) on (real, imag) pairs
    replaced by torch.fft.fft: dense sketch matrices, per-position FFT product, sum over positions."""
    import torch
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, c)
    dense = [torch.zeros(c, d, dtype=x.dtype) for _ in range(2)]
    for t in range(2):
        dense[t][torch.arange(c), torch.as_tensor(index[t], dtype=torch.long)] = torch.as_tensor(sign[t], dtype=x.dtype)
    f0 = torch.fft.fft(flat.mm(dense[0]), dim=1)
    f1 = torch.fft.fft(flat.mm(dense[1]), dim=1)
    y = torch.fft.ifft(f0 * f1, dim=1).real.reshape(b, h * w, d).sum(dim=1)
    y = torch.sign(y) * torch.sqrt(torch.abs(y) + 1e-8)
    return torch.nn.functional.normalize(y).numpy()


def test_cbp_with_fast_mpn_cov_hashes_reproduces_its_forward():
    # A converted fast-MPN-COV CBP checkpoint holds no hashes: torch_cbp_hashes redraws them.
    import torch
    index, sign = torch_cbp_hashes(16, 32)
    torch.manual_seed(1)
    assert (index[0] == torch.randint(0, 32, (16,)).numpy()).all()  # its first draw, as CBP.__init__
    x = _features((2, 16, 3, 3), seed=8)
    ref = _torch_fast_mpn_cov_cbp(torch.as_tensor(x), index, sign, 32)
    head = CBP(16, 32)
    head.sketch_index.set_data(Tensor(index))
    head.sketch_sign.set_data(Tensor(sign))
    np.testing.assert_allclose(head(Tensor(x.astype(np.float32))).asnumpy(), ref, rtol=1e-5, atol=1e-6)


def test_fft_and_gram_methods_agree_at_vgg_width():
    # 512 channels as on VGG-16, a smaller sketch: the two computations of one quantity.
    x = Tensor(_features((2, 512, 3, 3), seed=4).astype(np.float32))
    a = CBP(512, 1024, method="fft")(x).asnumpy()
    b = CBP(512, 1024, method="gram")(x).asnumpy()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bcnn_uses_the_full_matrix_and_cbp_sums_positions():
    # fast-MPN-COV: B-CNN vectorises all C*C entries (symmetric pairs twice) and divides by M;
    # CBP sums over positions. Scaling the positions' count (tiling the map) changes neither output.
    x = _features((1, 4, 2, 2), seed=5)
    tiled = np.tile(x, (1, 1, 2, 3)).astype(np.float32)
    bcnn = BCNN(4)
    cbp = CBP(4, 16, method="gram")
    assert bcnn.output_dim == 16 and cbp.output_dim == 16
    np.testing.assert_allclose(bcnn(Tensor(tiled)).asnumpy(), np_bcnn(x), rtol=1e-5, atol=1e-7)
    out = cbp(Tensor(tiled)).asnumpy()
    index, sign = cbp.sketch_index.asnumpy(), cbp.sketch_sign.asnumpy()
    np.testing.assert_allclose(out, np_signed_sqrt_l2(6 * np_tensor_sketch_outer(x, index, sign, 16)),
                               rtol=1e-5, atol=1e-7)


def test_zero_features_give_finite_outputs_and_gradients():
    head = CBP(4, 8, method="gram")
    loss, grad = FwdBwd(head)(Tensor(np.zeros((2, 4, 2, 2), np.float32)), Tensor(np.ones((2, 8), np.float32)))
    assert np.isfinite(loss.asnumpy()) and np.isfinite(grad.asnumpy()).all()
    assert np.isfinite(BCNN(4)(Tensor(np.zeros((1, 4, 2, 2), np.float32))).asnumpy()).all()


# ---------------------------------------------------------------- in the network

def test_registry_config_and_parameters():
    # (load_config starts from the digits demo config, which reduces to 64 channels: unset it.)
    cfg = load_config(["--head=cbp", "--arch=resnet50", "--num_classes=5", "--proj_dim=64", "--cbp_method=gram",
                       "--dimension_reduction=null"])
    assert head_kwargs(cfg) == {"proj_dim": 64, "cbp_method": "gram"}  # a null key keeps the head's default
    net = build_network(cfg)
    rep = net.representation
    assert isinstance(rep, CBP) and (rep.proj_dim, rep.method, rep.dim) == (64, "gram", 2048)
    names = {p.name for p in net.get_parameters()}
    trainable = {p.name for p in net.trainable_params()}
    assert {"sketch_index", "sketch_sign"} <= names - trainable
    assert net.classifier.fc.weight.shape == (5, 64)
    # dimension_reduction left null: each head's own default (fast-MPN-COV's).
    unset = ["--dimension_reduction=null", "--arch=resnet18", "--num_classes=5"]
    assert build_network(load_config(["--head=isqrt_cov"] + unset)).representation.dim == 256
    bcnn = build_network(load_config(["--head=bcnn"] + unset))
    assert isinstance(bcnn.representation, BCNN) and bcnn.representation.output_dim == 512 * 512
    reduced = build_network(load_config(["--head=bcnn", "--arch=resnet18", "--num_classes=5",
                                         "--dimension_reduction=32"]))
    assert reduced.representation.output_dim == 32 * 32 and "layer_reduce.weight" in \
        {p.name for p in reduced.trainable_params()}
    with pytest.raises(ValueError, match="unknown argument"):
        create_model("resnet18", "bcnn", 3, proj_dim=8)


def test_checkpoint_round_trip_restores_hashes_and_logits(tmp_path):
    net = create_model("resnet18", "cbp", 3, proj_dim=256)
    net.set_train(False)
    x = Tensor(np.random.default_rng(6).standard_normal((2, 3, 32, 32)).astype(np.float32))
    logits = net(x).asnumpy()
    path = str(tmp_path / "cbp.ckpt")
    save_atomic(net, path)
    other = create_model("resnet18", "cbp", 3, proj_dim=256)
    index, sign = sketch_hashes(512, 256, seed=7)
    other.representation.sketch_index.set_data(Tensor(index))
    other.representation.sketch_sign.set_data(Tensor(sign))
    load_network(other, path)
    other.set_train(False)
    np.testing.assert_array_equal(other.representation.sketch_index.asnumpy(),
                                  net.representation.sketch_index.asnumpy())
    assert other.representation.sketch_index.dtype == ms.int32
    np.testing.assert_allclose(other(x).asnumpy(), logits, rtol=1e-5, atol=1e-6)


def test_finetuning_from_gap_weights_keeps_the_drawn_hashes(tmp_path):
    # fast-MPN-COV finetunes B-CNN / CBP from ImageNet GAP networks: the backbone loads, the
    # classifier is new, CBP's hashes (absent from such a checkpoint) keep their seeded draw.
    gap = create_model("resnet18", "gap", 4)
    path = str(tmp_path / "gap.ckpt")
    save_atomic(gap, path)
    net = create_model("resnet18", "cbp", 3, proj_dim=64)
    index = net.representation.sketch_index.asnumpy().copy()
    _, left = load_network(net, path, pre_trained=True)
    hashes = {p.name for p in net.representation.get_parameters()}
    assert hashes == {"sketch_index", "sketch_sign"} and set(left) == {"fc.weight", "fc.bias"} | hashes
    np.testing.assert_array_equal(net.features.conv1.weight.asnumpy(), gap.features.conv1.weight.asnumpy())
    np.testing.assert_array_equal(net.representation.sketch_index.asnumpy(), index)
    with pytest.raises(CheckpointError, match="sketch_index"):  # evaluation or resume: all must be there
        load_network(create_model("resnet18", "cbp", 4, proj_dim=64), path)


@pytest.mark.parametrize("head", ["bcnn", "cbp"])
def test_one_training_step_graph_mode(head):
    cfg = load_config([f"--head={head}", "--arch=resnet18", "--num_classes=3", "--proj_dim=512", "--lr=0.1",
                       "--dimension_reduction=0"])
    net = build_network(cfg)
    opt = build_optimizer(cfg, net, np.full(2, 0.1, np.float32))
    step = build_train_step(cfg, net, opt)
    index = net.representation.sketch_index.asnumpy().copy() if head == "cbp" else None
    before = net.classifier.fc.weight.asnumpy().copy()
    x = Tensor(np.random.default_rng(7).standard_normal((4, 3, 64, 64)).astype(np.float32))
    loss, control = step(x, Tensor(np.array([0, 1, 2, 0], np.int32)), Tensor(0.0, ms.float32))
    assert np.isfinite(loss.asnumpy()) and control.asnumpy()[0] == 0
    assert not np.allclose(net.classifier.fc.weight.asnumpy(), before)
    if head == "cbp":  # the hashes are not trained
        np.testing.assert_array_equal(net.representation.sketch_index.asnumpy(), index)


def test_count_flops():
    gap = count_flops(create_model("resnet18", "gap", 10), 64)
    bcnn_net = create_model("resnet18", "bcnn", 10)
    bcnn = count_flops(bcnn_net, 64)
    cbp = count_flops(create_model("resnet18", "cbp", 10, proj_dim=1024, cbp_method="gram"), 64)
    # Same backbone (2x2 at 64 input); only the classifier's input width differs.
    assert bcnn["conv_fc"] - gap["conv_fc"] == (512 * 512 - 512) * 10
    assert cbp["conv_fc"] - gap["conv_fc"] == (1024 - 512) * 10
    assert bcnn["meta"] == cbp["meta"] == 512 * 512 * 4 and gap["meta"] == 0
    assert bcnn["total"] == bcnn["conv_fc"] + bcnn["meta"]
