"""Checkpoints: finetuning from a backbone-only checkpoint (issue 11 item 5), and failed writes on a
full disk (issue 12 item 7), in-process with a simulated disk and end to end with a real write limit."""
import errno
import json
import os
import resource
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
import torch

from bench.peers.torch_resnet import create_torch_model, randomize_
from src.checkpoint import head_parameter_names, match_network, save_atomic
from src.errors import CheckpointError
from src.models import create_model
from src.run_log import write_json
from tests.helpers import ENV, ROOT, make_image_folder, run_script, tiny_flags

HEAD_NAMES = {"layer_reduce.weight", "layer_reduce_bn.gamma", "layer_reduce_bn.beta", "layer_reduce_bn.moving_mean",
              "layer_reduce_bn.moving_variance", "fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def net():
    return create_model("resnet18", "isqrt_cov", 3, dimension_reduction=16)


def _own_params(net):
    return {p.name: ms.Parameter(p.data.copy(), name=p.name) for p in net.get_parameters()}


# ------------------------------------------------------------------ --pre_trained (issue 11 item 5)
def test_the_head_is_the_representation_and_the_classifier(net):
    assert head_parameter_names(net) == HEAD_NAMES


def test_pretrained_leaves_a_new_head_at_initialisation_and_names_it(net):
    params = _own_params(net)
    for name in ("layer_reduce.weight", "layer_reduce_bn.gamma"):
        del params[name]
    params["fc.weight"] = ms.Parameter(ms.Tensor(np.zeros((5, 136), np.float32)), name="fc.weight")
    params["fc.bias"] = ms.Parameter(ms.Tensor(np.zeros(5, np.float32)), name="fc.bias")
    chosen, left = match_network(net, params, "x.ckpt", pre_trained=True)
    assert left == {"layer_reduce.weight": "not in the checkpoint", "layer_reduce_bn.gamma": "not in the checkpoint",
                    "fc.weight": "another shape in the checkpoint", "fc.bias": "another shape in the checkpoint"}
    assert set(chosen) == {p.name for p in net.get_parameters()} - set(left)
    # Without --pre_trained the same file is refused; a classifier-only difference names the class counts.
    with pytest.raises(CheckpointError, match="missing 2: layer_reduce.weight, layer_reduce_bn.gamma"):
        match_network(net, params, "x.ckpt")
    params = _own_params(net)
    params["fc.bias"] = ms.Parameter(ms.Tensor(np.zeros(5, np.float32)), name="fc.bias")
    with pytest.raises(CheckpointError, match=r"has 5 classes and the network 3: set --num_classes=5"):
        match_network(net, params, "x.ckpt")


def test_pretrained_needs_the_whole_backbone(net):
    params = _own_params(net)
    del params["layer3.1.conv2.weight"], params["layer4.0.bn1.moving_mean"], params["fc.weight"]
    with pytest.raises(CheckpointError) as info:
        match_network(net, params, "x.ckpt", pre_trained=True)
    msg = str(info.value)
    assert "missing 2: layer3.1.conv2.weight, layer4.0.bn1.moving_mean" in msg and "fc.weight" not in msg
    assert "--pre_trained needs the whole backbone" in msg
    # A deeper backbone's extra blocks (resnet34 into resnet18) are not silently dropped either.
    params = _own_params(net)
    params["layer1.2.conv1.weight"] = ms.Parameter(ms.Tensor(np.zeros((64, 64, 3, 3), np.float32)),
                                                   name="layer1.2.conv1.weight")
    with pytest.raises(CheckpointError, match="unexpected 1: layer1.2.conv1.weight"):
        match_network(net, params, "x.ckpt", pre_trained=True)


def test_train_from_a_converted_torchvision_backbone(data, net, tmp_path):
    """torchvision-layout ResNet-18 state_dict -> convert_torch_checkpoint.py --head isqrt_cov ->
    train.py --pre_trained: the log names the head left at initialisation, and after a step at lr 0
    every backbone weight is the PyTorch one."""
    model = randomize_(create_torch_model("resnet18", "gap", 1000), seed=7)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    pth, ckpt = tmp_path / "resnet18_tv.pth", tmp_path / "resnet18_tv.ckpt"
    torch.save(model.state_dict(), pth)
    conv = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_torch_checkpoint.py"),
                           "--src", str(pth), "--dst", str(ckpt), "--arch", "resnet18", "--head", "isqrt_cov",
                           "--num_classes", "3", "--dimension_reduction", "16"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert conv.returncode == 0, conv.stderr
    out = str(tmp_path / "out")
    proc = run_script("train.py", tiny_flags(data, out, pre_trained=str(ckpt), lr=0, epoch_size=1,
                                             max_steps_per_epoch=1), cwd=tmp_path)
    line = next(x for x in proc.stdout.splitlines() if "initialised from" in x)
    n_params = len(list(net.get_parameters()))
    assert f"{n_params - 7} parameters loaded; 7 left at initialisation: " in line
    assert ("fc.bias, fc.weight, layer_reduce.weight, layer_reduce_bn.beta, layer_reduce_bn.gamma, "
            "layer_reduce_bn.moving_mean, layer_reduce_bn.moving_variance (not in the checkpoint)") in line

    trained = ms.load_checkpoint(os.path.join(out, "ckpt", "epoch_001.ckpt"))
    bn = {"weight": "gamma", "bias": "beta"}
    checked = 0
    for name, value in state.items():
        module, _, field = name.rpartition(".")
        if field in ("running_mean", "running_var", "num_batches_tracked") or module == "fc":
            continue  # running statistics move in a training step even at lr 0; fc is not converted
        ms_name = f"{module}.{bn[field]}" if value.ndim == 1 else name
        np.testing.assert_array_equal(trained[ms_name].asnumpy(), value, err_msg=name)
        checked += 1
    assert checked == 60  # 20 convolutions, 20 BatchNorms' gamma and beta
    assert trained["fc.weight"].shape == (3, 136)


# ------------------------------------------------------------------ failed writes (issue 12 item 7)
class _SmallDisk:
    """MindSpore's checkpoint file opener on a disk with ``free`` bytes left: writes beyond fail
    with ENOSPC after writing what fits, as a full file system does."""

    def __init__(self, free):
        self.free = free

    def __call__(self, path, mode):
        disk = self
        f = open(path, mode)
        raw_write = f.write

        def write(data):
            if len(data) > disk.free:
                raw_write(bytes(data)[:disk.free])
                disk.free = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.free -= len(data)
            return raw_write(data)
        f.write = write
        return f


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    from mindspore.train import serialization
    cell = ms.nn.Dense(1024, 512)
    path = str(tmp_path / "latest.ckpt")
    save_atomic(cell, path, {"epoch": 1})
    before = open(path, "rb").read()
    old_weight = cell.weight.asnumpy().copy()
    cell.weight.set_data(ms.Tensor(old_weight + 1))
    monkeypatch.setattr(serialization._ckpt_fs, "create", _SmallDisk(free=len(before) // 2))
    with pytest.raises(CheckpointError) as info:
        save_atomic(cell, path, {"epoch": 2})
    msg = str(info.value)
    assert "\n" not in msg
    needed = (1024 * 512 + 512) * 4 / 2 ** 20
    assert msg.startswith(f"cannot write {path} (No space left on device): it needs about {needed:.1f} MB, ")
    assert "the previous files there are unchanged" in msg and "--output_path" in msg
    assert f"--resume_ckpt={path}" in msg
    assert os.listdir(tmp_path) == ["latest.ckpt"]  # no temporary file left behind
    assert open(path, "rb").read() == before
    monkeypatch.undo()
    restored = ms.load_checkpoint(path)
    np.testing.assert_array_equal(restored["weight"].asnumpy(), old_weight)
    assert int(restored["epoch"].asnumpy()) == 1


def test_a_json_write_that_fails_at_flush_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "class_names.json")
    write_json(path, ["a", "b"])

    def fsync(fd):  # delayed allocation: the data only meets the full disk at fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"cannot write .*class_names.json \(No space left on device\)"):
        write_json(path, ["c", "d", "e"])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["class_names.json"]
    assert json.load(open(path)) == ["a", "b"]


def test_train_stops_cleanly_when_a_checkpoint_exceeds_the_file_size_limit(data, tmp_path):
    """A real failed write inside MindSpore's writer: after epoch 1's checkpoints, the running
    trainer's file size limit (RLIMIT_FSIZE) is lowered below latest.ckpt's size."""
    out = str(tmp_path / "out")
    ckpt_dir = os.path.join(out, "ckpt")
    latest = os.path.join(ckpt_dir, "latest.ckpt")
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + tiny_flags(data, out, epoch_size=2,
                                                                         max_steps_per_epoch=2)
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=ENV, stdout=so, stderr=se)
        deadline = time.time() + 300
        while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, open(tmp_path / "stderr").read()[-3000:]
        # best.ckpt and epoch_002.ckpt (weights) still fit; latest.ckpt (weights and momentum) does not.
        best, full = os.path.getsize(os.path.join(ckpt_dir, "best.ckpt")), os.path.getsize(latest)
        limit = (best + full) // 2
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        before = open(latest, "rb").read()
        proc.wait(timeout=300)
    stdout, stderr = open(tmp_path / "stdout").read(), open(tmp_path / "stderr").read()
    assert proc.returncode == 2, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {latest} (File too large): it needs about "), last
    assert "the previous files there are unchanged" in last
    assert [f for f in os.listdir(ckpt_dir) if f.startswith(".")] == []
    assert open(latest, "rb").read() == before
    assert int(ms.load_checkpoint(latest)["epoch"].asnumpy()) == 0
