"""Mixed precision (issue 11): O1, O2 and O3 train; the meta-layer stays float32 inside at every
level (checked against the float32 O0 network); the dynamic loss scale skips overflowing steps,
halves and grows back; train.py at O2 end to end on CPU."""
import json
import logging
import os
import signal
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src import precision
from src.config import load_config
from src.factory import build_optimizer, build_train_step, resolve_amp_level
from src.models import create_model
from src.models.network import ClassificationNet, GlobalAvgPool
from src.precision import apply_precision, check_float32, find_representation
from tests.helpers import ENV, HOOKED_TRAIN, ROOT, make_image_folder, run_script, stop_when_logged, tiny_flags

FEATURES = (2, 512, 4, 4)  # ResNet-18's layer4 output, the representation's input
DIM = 8


def _cfg(*flags):
    return load_config(["--num_classes=3", f"--dimension_reduction={DIM}"] + list(flags))


def _net():
    return create_model("resnet18", "isqrt_cov", 3, dimension_reduction=DIM)


def _copy_of(net):
    twin = _net()
    ms.load_param_into_net(twin, {p.name: ms.Parameter(ms.Tensor(p.asnumpy().copy()), name=p.name)
                                  for p in net.get_parameters()}, strict_load=True)
    return twin


def _trainable(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


class _Probe(nn.Cell):
    """(sum(representation(x) * w), representation(x)): the gradients of the first are the
    representation's backward for dl/dout = w. ``auto_prefix=False`` keeps the parameter names."""

    def __init__(self, rep, w):
        super().__init__(auto_prefix=False)
        self.rep = rep
        self.w = ms.Tensor(w)

    def construct(self, x):
        out = self.rep(x)
        return (ops.cast(out, ms.float32) * self.w).sum(), out


def _run_rep(rep, x):
    """(output, dl/dx, {parameter name: dl/dparameter}) of the representation in training mode."""
    rep.set_train(True)
    weights = ms.ParameterTuple(rep.trainable_params())
    w = np.random.default_rng(1).standard_normal((FEATURES[0], DIM * (DIM + 1) // 2)).astype(np.float32)
    (dx, dw), (out,) = ms.grad(_Probe(rep, w), grad_position=0, weights=weights, has_aux=True)(ms.Tensor(x))
    return out.asnumpy(), dx, {p.name: g.asnumpy() for p, g in zip(weights, dw)}


@pytest.fixture(scope="module")
def reference():
    """The O0 (float32) network, a float16 feature batch, and the O0 representation's results on it."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(3)
    net = _net()
    rng = np.random.default_rng(0)
    x16 = np.abs(rng.standard_normal(FEATURES)).astype(np.float16)  # ReLU output, float16 as under O2/O3
    out, dx, dw = _run_rep(net.representation, x16.astype(np.float32))  # exactly the same values
    assert out.dtype == np.float32 and dx.dtype == ms.float32
    return net, x16, out, dx.asnumpy(), dw


FLOAT32_RTOL = 2e-5  # float32 rounding of the same products; a float16 step anywhere inside is ~1e-3


def _assert_float32_close(actual, expected, what):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * scale, err_msg=what)


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_level_trains_and_keeps_the_meta_layer_float32(reference, level):
    ref_net, x16, out_ref, dx_ref, dw_ref = reference
    net = _copy_of(ref_net)
    rep = find_representation(net)
    names = [p.name for p in net.get_parameters()]
    cfg = _cfg(f"--amp_level={level}", "--lr=0.05")
    step = build_train_step(cfg, net, build_optimizer(cfg, net, np.full(2, 0.05, np.float32)))
    assert [p.name for p in net.get_parameters()] == names  # checkpoints keep their keys
    assert all(p.dtype == ms.float32 for p in net.get_parameters())  # float32 master weights
    with pytest.raises(RuntimeError, match=f"already applied to this network \\({level}\\)"):
        apply_precision(net, "O2")

    # The meta-layer as the mixed-precision network holds it, on the float16 features it receives there.
    out, dx, dw = _run_rep(rep, x16)
    assert out.dtype == np.float32
    _assert_float32_close(out, out_ref, f"{level} representation output")
    for name, g in dw_ref.items():  # the reduction conv / BN gradients: float32 all the way back
        _assert_float32_close(dw[name], g, f"{level} d/d{name}")
    # The gradient entering the float16 backbone is float16: O0's, rounded once (within one float16 ulp).
    assert dx.dtype == ms.float16
    ulp = np.spacing(np.abs(dx_ref).astype(np.float16)).astype(np.float32)
    assert (np.abs(dx.asnumpy().astype(np.float32) - dx_ref) <= ulp).all()

    # The whole network trains a step at this level: finite float32 loss, weights updated.
    before = _trainable(net)
    rng = np.random.default_rng(2)
    loss, control = step(ms.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)),
                         ms.Tensor(np.array([0, 1, 2, 0], np.int32)), ms.Tensor(0.0, ms.float32))
    assert loss.dtype == ms.float32 and np.isfinite(loss.asnumpy()) and control.asnumpy()[0] == 0
    after = _trainable(net)
    assert all(not np.array_equal(before[n], after[n]) for n in ("conv1.weight", "layer_reduce.weight", "fc.weight"))


def test_the_comparison_detects_a_float16_step_in_the_meta_layer(reference):
    """Control for the test above: a single float16 cast inside (TriuVec's input) exceeds its tolerance,
    and apply_precision's structural check names the offending cell."""
    ref_net, x16, out_ref, _, _ = reference
    net = _copy_of(ref_net)
    net.representation.to_float(ms.float32)
    net.representation.triu.add_flags(fp16=True, fp32=False)
    out = net.representation(ms.Tensor(x16)).asnumpy()
    with pytest.raises(AssertionError):
        _assert_float32_close(out.astype(np.float32), out_ref, "float16 TriuVec input")
    with pytest.raises(RuntimeError, match="representation cells not in float32 .*triu"):
        check_float32(net, net.representation)


def test_network_without_representation_is_refused_at_build_time():
    with pytest.raises(TypeError, match="no 'representation' Cell"):
        apply_precision(nn.SequentialCell([nn.Dense(4, 3)]), "O2")
    dense = nn.Dense(4, 3)
    assert apply_precision(dense, "O0") is dense  # O0 changes nothing and needs nothing
    # O2's black list holds classes: a backbone cell of the representation's class is refused.
    twin = ClassificationNet(nn.SequentialCell([nn.Conv2d(3, 4, 1), GlobalAvgPool(4)]), GlobalAvgPool(4), 3)
    with pytest.raises(RuntimeError, match="GlobalAvgPool, which other cells use too: features.1"):
        apply_precision(twin, "O2")


def test_float16_levels_run_on_cpu_with_one_warning(monkeypatch):
    monkeypatch.setattr(precision, "_FLOAT16_ON_CPU_WARNED", [])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("isqrt_cov")
    logger.addHandler(handler)
    try:
        assert resolve_amp_level(_cfg("--device_target=CPU")) == "O0"  # auto on CPU: float32, no warning
        assert not records
        for level in ("O1", "O2", "O3", "O2"):
            assert resolve_amp_level(_cfg(f"--amp_level={level}")) == level
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and "not for speed" in records[0].getMessage()


def test_dynamic_loss_scale_skips_overflow_halves_and_grows_back():
    """Overflow injected the way float16 overflows: a loss scale of 2^20 makes the scaled float16
    gradients inf (dl/dlogits ~ 0.1 x 2^20 > 65504). Checked step by step against the rule of
    DynamicLossScaleUpdateCell: overflow -> skip the update, scale / 2; after ``loss_scale_window``
    consecutive good steps -> scale x 2."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(4)
    window = 3
    cfg = _cfg("--amp_level=O2", "--dynamic_loss_scale=True", f"--loss_scale={2 ** 20}",
               f"--loss_scale_window={window}", "--lr=0.01")
    net = _net()
    steps = 10
    step = build_train_step(cfg, net, build_optimizer(cfg, net, np.full(steps, 0.01, np.float32)))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    y = ms.Tensor(np.array([0, 1, 2, 0], np.int32))
    expected, good_run, history = 2.0 ** 20, 0, []
    for _ in range(steps):
        before = _trainable(net)
        loss, control = step(x, y, ms.Tensor(0.0, ms.float32))
        overflow, _, scale, _ = control.asnumpy()
        overflow = bool(overflow)
        after = _trainable(net)
        assert float(scale) == expected and np.isfinite(loss.asnumpy())
        changed = [n for n in before if not np.array_equal(before[n], after[n])]
        if overflow:
            assert not changed  # skipped: no weight moved
            expected, good_run = max(expected / 2, 1.0), 0
        else:
            assert "fc.weight" in changed and "conv1.weight" in changed
            good_run += 1
            if good_run == window:
                expected, good_run = expected * 2, 0
        assert float(step.scale_sense.asnumpy()) == expected
        history.append((overflow, expected))
    assert history[0] == (True, 2.0 ** 19)
    grew = [i for i in range(1, steps) if history[i][1] > history[i - 1][1]]
    assert grew and not any(history[i][0] for i in range(grew[0] - window + 1, grew[0] + 1)), history


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _counter(state):
    """The loss-scale cell's step counter (1 + steps taken) saved in a training checkpoint."""
    found = [v for k, v in state.items() if k.endswith("current_iterator_step")]
    assert len(found) == 1, sorted(state)
    return int(found[0].asnumpy())


def test_train_py_o2_end_to_end_evaluates_and_resumes(data, tmp_path):
    """The GPU default (O2, dynamic loss scale) through the scripts: train, stop by SIGTERM inside
    epoch 2, evaluate best.ckpt, resume and finish."""
    out = str(tmp_path / "out")
    flags = dict(amp_level="O2", dynamic_loss_scale=True)
    # tests/hooks.py's log delay: the SIGTERM lands at the same step however busy the machine is, so the
    # resumed epoch averages the same steps every time
    cmd = [sys.executable, os.path.join(ROOT, HOOKED_TRAIN)] + tiny_flags(data, out, **flags)
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=dict(ENV, ISQRT_COV_LOG_DELAY="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = stop_when_logged(proc, "epoch 2/2 step 2/")
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "amp_level=O2 on CPU" in log and "not for speed" in log
    ckpt = os.path.join(out, "ckpt")
    latest = os.path.join(ckpt, "latest.ckpt")
    for name in ("latest.ckpt", "best.ckpt", "config.yaml"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    state = ms.load_checkpoint(latest)
    done = 6 + int(state["step_in_epoch"].asnumpy())  # 6 steps per epoch; stopped inside epoch 2
    assert int(state["epoch"].asnumpy()) == 1 and 8 <= done < 12
    assert float(state["scale_sense"].asnumpy()) == 1024.0 and _counter(state) == done + 1  # no overflow
    for name, value in state.items():
        if hasattr(value, "asnumpy") and value.dtype in (ms.float32, ms.float16):
            assert value.dtype == ms.float32, f"{name} saved as {value.dtype}"  # float32 master weights
            assert np.isfinite(value.asnumpy()).all(), name

    ev = run_script("eval.py", tiny_flags(data, out, checkpoint_file_path=os.path.join(ckpt, "best.ckpt")),
                    cwd=tmp_path)
    metrics = json.load(open(os.path.join(out, "eval_metrics.json")))
    (epoch1,) = _metrics(out)
    # eval.py runs float32; training evaluated the float16 network: equal to float16 precision.
    assert metrics["num_images"] == 12 and "top-1" in ev.stdout
    assert metrics["loss"] == pytest.approx(epoch1["val_loss"], rel=5e-3)
    assert abs(metrics["top1"] - epoch1["val_top1"]) <= 1 / 12 + 1e-9

    resumed = run_script("train.py", tiny_flags(data, out, resume_ckpt=latest, **flags), cwd=tmp_path)
    assert f"at epoch 2 step {done - 6}" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    losses = [r["train_loss"] for r in rows]
    assert all(np.isfinite(losses)) and losses[1] < losses[0], losses
    assert _counter(ms.load_checkpoint(latest)) == 12 + 1  # the loss-scale state went on from the checkpoint


def test_a_collapsed_loss_scale_stops_the_run(tmp_path):
    """An overflow at loss scale 1 cannot be cured by lowering the scale: train.py stops, naming the
    step, exit 3, and writes no checkpoint of that epoch. The step before the NaN batch trains."""
    data = make_image_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=1)
    out = str(tmp_path / "out")
    proc = run_script(HOOKED_TRAIN, tiny_flags(data, out, amp_level="O2", loss_scale=1, epoch_size=1),
                      cwd=tmp_path, env={"ISQRT_COV_INJECT_NAN_STEP": "1"}, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 1 overflowing step(s) in a row, loss scale 1 at epoch 1 step 2 (global step 1) on at least one "
        f"rank: the run stopped and no checkpoint was written; lower --lr, check the data, or resume from "
        f"{os.path.join(out, 'ckpt', 'latest.ckpt')}")
    assert "epoch 1/1 step 1/2 loss" in proc.stdout
    assert not os.path.exists(os.path.join(out, "ckpt", "latest.ckpt"))


def test_fixed_loss_scale_skips_an_overflowing_step_and_goes_on(tmp_path):
    """O2 with a fixed scale: the NaN batch of global step 1 is skipped on every rank and counted,
    the run goes on to the end (exit 0) with finite weights and the scale unchanged."""
    data = make_image_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=1)
    out = str(tmp_path / "out")
    proc = run_script(HOOKED_TRAIN, tiny_flags(data, out, amp_level="O2", dynamic_loss_scale=False, loss_scale=1024),
                      cwd=tmp_path, env={"ISQRT_COV_INJECT_NAN_STEP": "1"})
    log = proc.stdout + proc.stderr
    assert ("epoch 1 step 2 (global step 1): overflow, step skipped on every rank (fixed loss scale 1024), "
            "1 in a row") in log
    assert log.count("overflow, step skipped") == 1 and "epoch 2/2 step 2/2 loss" in log
    state = ms.load_checkpoint(os.path.join(out, "ckpt", "latest.ckpt"))
    assert int(state["epoch"].asnumpy()) == 1 and float(state["scale_sense"].asnumpy()) == 1024.0
    for name, value in state.items():
        if hasattr(value, "asnumpy") and value.dtype == ms.float32:
            assert np.isfinite(value.asnumpy()).all(), name
    assert all(np.isfinite(r["train_loss"]) for r in _metrics(out))


class _FakeStep:
    def __init__(self, float16, dynamic):
        self.float16, self.scale_update = float16, (object() if dynamic else None)


def _bare_trainer(float16, dynamic):
    from src.engine import Trainer
    t = Trainer.__new__(Trainer)
    t.train_step, t.steps_per_epoch, t._overflows = _FakeStep(float16, dynamic), 10, 0
    t.log, t.ckpt = logging.getLogger("test_fixed_scale"), type("C", (), {"latest": "latest.ckpt"})()
    return t


@pytest.mark.parametrize("dynamic", [False, True])
def test_float16_runs_stop_after_50_overflows_in_a_row_float32_at_the_first(dynamic):
    from src.engine import MAX_CONSECUTIVE_OVERFLOWS
    from src.errors import TrainingStopped
    assert MAX_CONSECUTIVE_OVERFLOWS == 50
    t = _bare_trainer(True, dynamic)
    over, good = ms.Tensor([1.0, 0.0, 1024.0, 0.0]), ms.Tensor([0.0, 0.0, 1024.0, 0.0])
    applied = []
    for _ in range(49):
        assert t._check(over, 0, 0, applied) == 0
    assert t._check(good, 0, 0, applied) == 0 and t._overflows == 0  # a good step resets the count
    for _ in range(49):
        t._check(over, 0, 0, applied)
    with pytest.raises(TrainingStopped, match="50 overflowing step"):
        t._check(over, 0, 0, applied)
    assert applied == [False] * 49 + [True] + [False] * 50
    f32 = _bare_trainer(False, False)
    with pytest.raises(TrainingStopped, match="non-finite loss, gradients or BatchNorm statistics"):
        f32._check(ms.Tensor([1.0, 0.0, 1.0, 0.0]), 0, 0, [])


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_input_normalisation_stays_float32(level):
    """build_network's networks take uint8 images and normalise them first: at every level that
    cell computes in float32 (a float16 mean or std would be off by up to 1e-3 of a unit)."""
    from src.config_schema import IMAGENET_MEAN, IMAGENET_STD
    from src.models.preprocess import InputNormalize
    net = create_model("resnet18", "gap", 3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    apply_precision(net, level)
    norm = [c for _, c in net.cells_and_names() if isinstance(c, InputNormalize)]
    assert len(norm) == 1 and not norm[0].get_flags().get("fp16")
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 4), dtype=np.uint8)
    out = norm[0](ms.Tensor(x)).asnumpy()
    ref = (x - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
