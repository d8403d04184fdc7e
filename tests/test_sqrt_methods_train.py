"""The square-root methods inside networks: refused on a device without their kernels, float32 at every
mixed-precision level, non-finite steps skipped as for ns, and train.py + eval.py (+ export.py and
predict.py) from a run on real images."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import nn

from src import matrix_functions
from src.config import load_config
from src.errors import DeviceError
from src.factory import build_network, build_optimizer, build_train_step
from src.isqrt_cov import ISqrtCov
from src.models import create_model
from src.models.network import ClassificationNet
from src.precision import apply_precision, check_float32
from tests.helpers import ROOT, make_image_folder, run_script, tiny_flags

NEW = ("mtp_lya", "mpa_lya", "svd_pade")


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("name, why", [("mpa_lya", "Cholesky"), ("svd_pade", "Eigh")])
def test_a_method_without_kernels_on_the_device_is_refused_when_the_network_is_built(monkeypatch, name, why):
    monkeypatch.setattr(matrix_functions, "current_device", lambda: "Ascend")
    for build in (lambda: create_model("resnet18", "isqrt_cov", 3, dimension_reduction=8, sqrt_method=name),
                  lambda: build_network(load_config(["--arch=resnet18", "--num_classes=3", f"--sqrt_method={name}",
                                                     "--device_target=Ascend"]))):
        with pytest.raises(DeviceError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message and f"sqrt_method {name} cannot run on Ascend" in message and why in message
        assert "ns, mtp_lya" in message  # what can run there
    for ok in ("ns", "mtp_lya"):
        assert create_model("resnet18", "isqrt_cov", 3, dimension_reduction=8, sqrt_method=ok)
    monkeypatch.setattr(matrix_functions, "current_device", lambda: "GPU")
    for ok in matrix_functions.SQRT_METHODS:
        assert create_model("resnet18", "isqrt_cov", 3, dimension_reduction=8, sqrt_method=ok)
    with pytest.raises(ValueError, match="unknown sqrt_method 'svd'.*ns, mtp_lya, mpa_lya, svd_pade"):
        create_model("resnet18", "isqrt_cov", 3, sqrt_method="svd")


# ---------------------------------------------------------------- float32 at every level, NaN steps

class _Stem(nn.Cell):
    """A tiny backbone: (B, 3, H, W) -> (B, 8, H/4, W/4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, has_bias=True)
        self.relu = nn.ReLU()
        self.out_channels = 8

    def construct(self, x):
        return self.relu(self.conv(x))


def _tiny_net(name, seed=3):
    ms.set_seed(seed)
    return ClassificationNet(_Stem(), ISqrtCov(8, dimension_reduction=6, sqrt_method=name), 3)


class _Probe(nn.Cell):
    """sum(representation(x) * w): its gradient is the representation's backward for dl/dout = w."""

    def __init__(self, rep, w):
        super().__init__(auto_prefix=False)
        self.rep = rep
        self.w = ms.Tensor(w)

    def construct(self, x):
        return (ms.ops.cast(self.rep(x), ms.float32) * self.w).sum()


def _rep_out_and_grad(rep, x, w):
    rep.set_train(False)
    return rep(ms.Tensor(x)).asnumpy(), ms.grad(_Probe(rep, w))(ms.Tensor(x))


@pytest.mark.parametrize("name", NEW)
def test_every_amp_level_keeps_the_method_float32(name):
    """Each level flags every cell of the method float32 (apply_precision's check would refuse the
    network otherwise), and under O3, the most float16 level, the representation computes the O0 result
    on float16 features to float32 rounding, backward included."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    x16 = np.abs(rng.standard_normal((2, 8, 4, 4))).astype(np.float16)
    w = rng.standard_normal((2, 21)).astype(np.float32)
    out_ref, dx_ref = _rep_out_and_grad(_tiny_net(name).representation, x16.astype(np.float32), w)
    for level in ("O1", "O2", "O3"):
        net = _tiny_net(name)
        rep = net.representation  # O2 wraps it in the network; the wrapped cell is what is checked
        apply_precision(net, level)
        check_float32(net, rep)
        cells = [type(c).__name__ for _, c in rep.sqrtm.cells_and_names()]
        assert cells[-1].startswith("_") and cells[-1].endswith("Fn")  # the method's bprop cell is among them
    out, dx = _rep_out_and_grad(rep, x16, w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, out_ref, rtol=2e-5, atol=2e-5 * np.abs(out_ref).max())
    ulp = np.spacing(np.abs(dx_ref.asnumpy()).astype(np.float16)).astype(np.float32)
    assert dx.dtype == ms.float16 and (np.abs(dx.asnumpy().astype(np.float32) - dx_ref.asnumpy()) <= ulp).all()
    rep.sqrtm.fn.add_flags(fp16=True, fp32=False)
    with pytest.raises(RuntimeError, match="not in float32 .*sqrtm.fn"):
        check_float32(net, rep)


@pytest.mark.parametrize("name", NEW)
def test_a_non_finite_batch_is_skipped_as_with_ns(name):
    """TrainStep (float32): a NaN batch and an Inf batch are skipped (flag set, weights untouched, no
    error); the next finite batch trains."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = load_config(["--num_classes=3", "--amp_level=O0", "--weight_decay=0"])
    net = _tiny_net(name)
    opt = build_optimizer(cfg, net, np.full(4, 0.1, np.float32))
    step = build_train_step(cfg, net, opt)
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    y, stop = ms.Tensor(np.array([0, 1, 2, 0], np.int32)), ms.Tensor(0.0, ms.float32)
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[1] = bad
        _, control = step(ms.Tensor(xb), y, stop)
        assert control.asnumpy()[0] == 1
        assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in net.trainable_params())
    loss, control = step(ms.Tensor(x), y, stop)
    assert control.asnumpy()[0] == 0 and np.isfinite(loss.asnumpy())
    assert not np.array_equal(net.classifier.fc.weight.asnumpy(), before["fc.weight"])


# ---------------------------------------------------------------- train.py + eval.py on real images

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


# method -> the shipped config its run starts from (tiny sizes and CPU on top): the family's configs,
# mtp_lya through the --sqrt_method override of its sibling's file, as users are told to.
RUN_CONFIGS = {"mtp_lya": "resnet50_mpa_lya_imagenet2012_config.yaml", "mpa_lya": "resnet50_mpa_lya_cub200_config.yaml",
               "svd_pade": "resnet50_svd_pade_imagenet2012_config.yaml"}


@pytest.mark.parametrize("name", NEW)
def test_train_then_eval_export_predict_from_the_run(data, tmp_path, name):
    """--sqrt_method reaches the run's saved config; eval.py (and, for svd_pade, whose Cell pools the
    features itself, export.py and predict.py on the MINDIR) rebuild the same network from the run."""
    out = str(tmp_path / "out")
    config = os.path.join(ROOT, "config", RUN_CONFIGS[name])
    run_script("train.py", tiny_flags(data, out, config_path=config, arch="resnet18", device_target="CPU",
                                      pre_trained="", train_resize=32, epoch_size=1, max_steps_per_epoch=3,
                                      sqrt_method=name), cwd=tmp_path)
    ckpt_dir = os.path.join(out, "ckpt")
    with open(os.path.join(ckpt_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["sqrt_method"] == name
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    best = os.path.join(ckpt_dir, "best.ckpt")
    from_run = [f"--checkpoint_file_path={best}", f"--data_path={data}", "--num_parallel_workers=1"]
    run_script("eval.py", from_run, cwd=tmp_path)
    metrics = json.load(open(os.path.join(out, "eval_metrics.json")))
    assert np.isfinite(row["train_loss"]) and metrics["num_images"] == 12
    assert metrics["top1"] == pytest.approx(row["val_top1"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(row["val_loss"], rel=1e-4)
    if name == "svd_pade":
        run_script("export.py", [f"--checkpoint_file_path={best}"], cwd=tmp_path)
        mindir = os.path.join(out, "resnet18_isqrt_cov.mindir")
        listing = str(tmp_path / "pred.json")
        run_script("predict.py", [f"--mindir={mindir}", f"--predict_path={os.path.join(data, 'val')}",
                                  f"--predict_output={listing}"], cwd=tmp_path)
        assert len(json.load(open(listing))["predictions"]) == 12


# new config -> (its base, the keys it changes): everything else is the base's recipe, which the base's
# own tests cover; the values are the authors' (config headers).
NEW_CONFIGS = {
    "resnet50_mpa_lya_imagenet2012_config.yaml": ("resnet50_imagenet2012_config.yaml", {"sqrt_method": "mpa_lya"}),
    "resnet50_mpa_lya_cub200_config.yaml": ("resnet50_cub200_config.yaml", {
        "sqrt_method": "mpa_lya", "pre_trained": "./pretrained/resnet50_mpa_lya_imagenet.ckpt"}),
    "resnet50_svd_pade_imagenet2012_config.yaml": ("resnet50_imagenet2012_config.yaml", {
        "sqrt_method": "svd_pade", "batch_size": 32, "epoch_size": 60, "lr": 0.0794, "lr_base_batch": 256,
        "lr_milestones": [30, 45]}),
    "resnet50_svd_pade_cub200_config.yaml": ("resnet50_cub200_config.yaml", {
        "sqrt_method": "svd_pade", "pre_trained": "./pretrained/resnet50_svd_pade_imagenet.ckpt"}),
}


@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_method_configs_are_their_base_recipe_plus_the_authors_changes(name):
    base, changes = NEW_CONFIGS[name]
    cfg = load_config(["--config_path", os.path.join(ROOT, "config", name)]).to_dict()
    ref = load_config(["--config_path", os.path.join(ROOT, "config", base)]).to_dict()
    differing = {k: v for k, v in cfg.items() if v != ref[k] and k != "config_path"}
    assert differing == changes
    net = build_network(load_config(["--config_path", os.path.join(ROOT, "config", name), "--device_target=CPU"]))
    assert net.representation.sqrt_method == changes["sqrt_method"] and net.representation.output_dim == 32896


# ---------------------------------------------------------------- benchmark smoke test

def test_benchmark_script_runs_on_a_tiny_size(tmp_path):
    """bench/sqrt_methods.py end to end (no speed asserted): runs, product counts, memory, ratios to ns
    (mtp_lya left out to save time: it shares mpa_lya's code path)."""
    out = tmp_path / "sqrt_methods.json"
    proc = run_script(os.path.join("bench", "sqrt_methods.py"),
                      ["--batch", "2", "--dim", "8", "--hw", "3", "--repeats", "1", "--warmup", "0", "--settle", "0",
                       "--methods", "ns,mpa_lya,svd_pade", "--out", str(out)], cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["config"]["hw"] == [3] and set(r["cpu"]) >= {"model", "avx512f"}
    assert set(r["runs"]) == {"ns/meta/3", "ns/sqrt/3", "mpa_lya/meta/3", "mpa_lya/sqrt/3", "svd_pade/meta/3"}
    for key, e in r["runs"].items():
        assert e["finite"] and e["median_ms"] > 0 and e["saved_mib"] > 0, key
    assert r["runs"]["ns/sqrt/3"]["products"] == {"forward": 12, "backward": 24}
    assert r["runs"]["mpa_lya/sqrt/3"]["products"] == {"forward": 4, "backward": 47}
    # Lya keeps its output and the norm; ns every iterate (2 + 3 (N - 1) matrices): 8x less at N = 5.
    assert r["runs"]["ns/sqrt/3"]["saved_mib"] > 5 * r["runs"]["mpa_lya/sqrt/3"]["saved_mib"]
    assert set(r["speedup_over_ns"]) == {"ns_over_mpa_lya/meta/3", "ns_over_svd_pade/meta/3", "ns_over_mpa_lya/sqrt/3"}
    assert "ns/meta/3" in proc.stdout
