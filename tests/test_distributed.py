"""Data parallelism on CPU: mpirun (the seed's launcher) and msrun, two processes each."""
import json
import os
import random
import re
import shutil
import signal
import time
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from src.distributed import SCHEDULER_CODE
from tests.helpers import ENV, HOOKED_TRAIN, ROOT, make_image_folder, run_script, tiny_flags

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2"]


def _msrun(log_dir):
    port = random.randint(20000, 40000)
    return ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", f"--log_dir={log_dir}",
            "--join=True"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), train_per_class=8, val_per_class=2, size=24)


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_same(a, b, rtol, atol, names=None):
    assert a.keys() == b.keys()
    for k in names or a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def _worker(data, out, launcher, distributed, tmp_path, accumulation=1):
    cmd = list(launcher) + [sys.executable if not launcher or launcher[0] == "mpirun" else ""]
    cmd = [c for c in cmd if c] + [os.path.join(ROOT, "tests", "dist_worker.py"), data, out, str(distributed),
                                   "2" if distributed else "1", str(accumulation)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_no_bn_network_matches_single_process_under_mpirun_and_msrun(data, tmp_path):
    """The gradient all-reduce in three fusion groups (classifier, last stage, first stage), as
    src.distributed.split_gradient_fusion splits every backbone: the same result as one process over
    the same global batch of 8, also when msrun's ranks make each update of 2 micro-batches of 2."""
    from src.distributed import split_gradient_fusion
    from tests.dist_worker import NoBNNet
    assert split_gradient_fusion(NoBNNet(3)) == [2, 2, 2]
    single, mpi, ms_out = (str(tmp_path / n) for n in ("single", "mpi", "msrun"))
    _worker(data, single, (), False, tmp_path)
    _worker(data, mpi, MPIRUN, True, tmp_path)
    _worker(data, ms_out, _msrun(str(tmp_path / "mslog")), True, tmp_path, accumulation=2)
    ref = _load(os.path.join(single, "rank_0.npz"))
    for out in (mpi, ms_out):
        r0, r1 = _load(os.path.join(out, "rank_0.npz")), _load(os.path.join(out, "rank_1.npz"))
        _assert_same(r0, r1, 0, 0)  # all-reduced gradients: bit-identical ranks
        _assert_same(r0, ref, 1e-4, 1e-6)  # = one process over the same global batch
    moved = max(np.abs(ref[k] - v).max() for k, v in _load(os.path.join(mpi, "rank_0.npz")).items())
    assert moved < 1e-4


def test_ranks_decide_together_and_a_failure_on_one_rank_stops_all(tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.run(MPIRUN + [sys.executable, os.path.join(ROOT, "tests", "ranks_worker.py"), out],
                          cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.load(open(os.path.join(out, f"rank_{r}.json"))) for r in (0, 1))
    for got in (r0, r1):
        assert got["sum"] == [2.0, 1.0] and got["gather"] == [10.0, 11.0] and got["broadcast"] == 7.0
        assert got["any_false"] is False and got["any_rank1"] is True
    assert (r0["agreed"], r1["agreed"]) == (100, 101)  # each rank's own result when all succeed
    assert r1["error"] == ["DataError", "rank 1 cannot read its shard"]  # the failing rank: its own error
    assert r0["error"] == ["RankFailed", "reading the data failed on rank 1 (see logs/rank_1.log); every rank stopped"]


def _flags(data, out, **kw):
    """The demo config on the user's own folders (demo_dataset stays 'digits'), two ranks. Deterministic
    crops, so a resumed run (which draws its random crops afresh) can equal the reference run."""
    return tiny_flags(data, out, run_distribute=True, device_num=2, batch_size=4, demo_dataset="digits",
                      train_transform="resize_center_crop", train_resize=32, **kw)


def _launcher(name, tmp_path):
    return MPIRUN if name == "mpirun" else _msrun(str(tmp_path / f"mslog{random.randint(0, 10**6)}"))


def _times(log, pattern):
    """Seconds of the day of the log lines containing ``pattern``."""
    out = []
    for line in log.splitlines():
        if pattern in line:
            h, m, s = (int(v) for v in line[:8].split(":"))
            out.append(3600 * h + 60 * m + s)
    return out


def _logs(out):
    return [open(os.path.join(out, "logs", f"rank_{r}.log")).read() for r in (0, 1)]


def _trained(path):
    """The weights, without BN running statistics (per device by design)."""
    weights = _load(path)
    return {k: v for k, v in weights.items() if not k.endswith(("moving_mean", "moving_variance"))}


def _check_lockstep(out, dump):
    logs = _logs(out)
    for log in logs:  # the user's 3 folders, not the digits demo, on every rank
        assert "3 classes, 6 steps/epoch x 2 epochs, 2 device(s) x batch 4" in log and "epoch 2/2 step 6/6" in log
        assert "2 process(es) on this machine" in log  # from mpirun's environment, or from msrun through MindSpore
    assert _times(logs[0], "val top-1")[0] <= _times(logs[0], "epoch 2/2 step 1/")[0]
    # rank 1 waited for rank 0's slow epoch-end work (45 s, beyond the CPU collectives' 30 s default)
    assert _times(logs[1], "epoch 2/2 step 1/")[0] - _times(logs[1], "epoch 1: val top-1")[0] >= 40
    r0, r1 = _trained(os.path.join(dump, "rank_0.npz")), _trained(os.path.join(dump, "rank_1.npz"))
    _assert_same(r0, r1, 0, 0)
    assert all(np.isfinite(v).all() for v in r0.values())
    initial = _trained(os.path.join(dump, "rank_0_initial.npz"))
    assert sorted(initial) == sorted(r0)
    unmoved = [k for k in r0 if np.array_equal(r0[k], initial[k])]
    assert not unmoved, unmoved  # every weight trained, not only agreed
    return logs


@pytest.fixture(scope="module")
def lockstep_data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("own")), train_per_class=16, val_per_class=2, size=24)


@pytest.fixture(scope="module")
def reference(lockstep_data, tmp_path_factory):
    """msrun, uninterrupted, rank 0 45 s late after epoch 1: the reference run of the tests below."""
    tmp = tmp_path_factory.mktemp("reference")
    out, dump = str(tmp / "out"), str(tmp / "weights")
    run_script(HOOKED_TRAIN, _flags(lockstep_data, out), cwd=tmp, launcher=_launcher("msrun", tmp),
               env={"ISQRT_COV_RANK0_DELAY": "45", "ISQRT_COV_DUMP_WEIGHTS": dump})
    return out, dump


def test_msrun_demo_config_on_own_data_waits_for_a_slow_rank0(reference):
    _check_lockstep(*reference)
    assert os.path.isfile(os.path.join(reference[0], "ckpt", "latest.ckpt"))


def test_mpirun_slow_rank0_and_a_nan_on_rank1_only(lockstep_data, tmp_path):
    """float16 (O2) with a dynamic loss scale: rank 1's NaN batch is skipped by both ranks, which stay
    identical, and rank 0 is 45 s late after epoch 1."""
    out, dump = str(tmp_path / "out"), str(tmp_path / "weights")
    run_script(HOOKED_TRAIN, _flags(lockstep_data, out, amp_level="O2"), cwd=tmp_path, launcher=MPIRUN,
               env={"ISQRT_COV_RANK0_DELAY": "45", "ISQRT_COV_DUMP_WEIGHTS": dump, "ISQRT_COV_INJECT_NAN_STEP": "2@1"})
    for log in _check_lockstep(out, dump):
        assert "epoch 1 step 3 (global step 2): overflow, step skipped on every rank (loss scale 1024 -> 512)" in log
        assert log.count("overflow") == 1
    left = subprocess.run(["pgrep", "-f", SCHEDULER_CODE], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout  # rank 0 stopped the scheduler it started


def test_float32_nan_on_one_rank_stops_every_rank(lockstep_data, tmp_path):
    proc = run_script(HOOKED_TRAIN, _flags(lockstep_data, str(tmp_path / "out")), cwd=tmp_path, launcher=MPIRUN,
                      env={"ISQRT_COV_INJECT_NAN_STEP": "2@1"}, check=False)
    assert proc.returncode == 3, proc.stdout[-3000:]
    message = ("error: non-finite loss, gradients or BatchNorm statistics at epoch 1 step 3 (global step 2) "
               "on at least one rank: the run stopped and no checkpoint was written")
    assert (proc.stdout + proc.stderr).count(message) == 2, proc.stdout[-3000:]


def _stop_rank1_when(proc, out, line, sig=signal.SIGTERM, timeout=300):
    log1 = os.path.join(out, "logs", "rank_1.log")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log1) and line in open(log1).read():
            os.kill(_rank_pid(1), sig)
            return
        time.sleep(0.2)
    raise AssertionError(f"rank 1 never logged '{line}'")


def test_sigterm_to_one_rank_stops_both_and_resume_equals_uninterrupted(lockstep_data, reference, tmp_path):
    out = str(tmp_path / "out")
    cmd = _msrun(str(tmp_path / "mslog")) + [os.path.join(ROOT, "train.py")] + _flags(lockstep_data, out)
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _stop_rank1_when(proc, out, "epoch 1/2 step 2/6")
        proc.communicate(timeout=300)
    finally:
        proc.kill()
    stopped = [re.findall(r"signal 15: saved \S+ at epoch 1 step (\d)", log) for log in _logs(out)]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, _logs(out)  # the same step on both ranks
    latest = os.path.join(out, "ckpt", "latest.ckpt")
    meta = ms.load_checkpoint(latest)
    assert int(meta["epoch"].asnumpy()) == 0 and int(meta["step_in_epoch"].asnumpy()) == int(stopped[0][0]) < 6

    run_script("train.py", _flags(lockstep_data, out, resume_ckpt=latest), cwd=tmp_path,
               launcher=_launcher("msrun", tmp_path))
    ref = ms.load_checkpoint(os.path.join(reference[0], "ckpt", "latest.ckpt"))
    got = ms.load_checkpoint(latest)
    for name, value in ref.items():
        if name.startswith(("moments.", "layer", "conv", "fc.")) and "moving" not in name:
            np.testing.assert_allclose(got[name].asnumpy(), value.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_resume_two_ranks_with_a_longer_or_shorter_epoch_size(lockstep_data, reference, tmp_path):
    """The finished 2-epoch run extended to 3 under mpirun, stopped on the way by SIGUSR1 to mpirun
    itself (which forwards it to every rank and, unlike SIGTERM, lets them finish), resumed again."""
    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)
    latest = os.path.join(out, "ckpt", "latest.ckpt")
    args = _flags(lockstep_data, out, resume_ckpt=latest, epoch_size=3)
    proc = subprocess.Popen(MPIRUN + [sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=str(tmp_path),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log1 = os.path.join(out, "logs", "rank_1.log")
        deadline = time.time() + 300
        while "epoch 3/3 step 2/6" not in open(log1).read() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, output[-3000:]
    stopped = [re.findall(r"signal 10: saved \S+ at epoch 3 step (\d)", log) for log in _logs(out)]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, output[-3000:]
    assert int(ms.load_checkpoint(latest)["step_in_epoch"].asnumpy()) == int(stopped[0][0])

    longer = run_script("train.py", args, cwd=tmp_path, launcher=MPIRUN)
    log0 = _logs(out)[0]
    assert f"at epoch 3 step {stopped[0][0]}" in log0 and "epoch 3/3 step 6/6" in log0 and "epoch 2/3" not in log0, \
        longer.stdout
    assert int(ms.load_checkpoint(latest)["epoch"].asnumpy()) == 2
    shorter = run_script("train.py", _flags(lockstep_data, out, resume_ckpt=latest, epoch_size=1), cwd=tmp_path,
                         launcher=MPIRUN)
    assert "has finished epoch 3 and epoch_size is 1: nothing to train" in shorter.stdout


def test_device_num_mismatch_is_refused(data, tmp_path):
    proc = run_script("train.py", tiny_flags(data, str(tmp_path / "o"), run_distribute=True, device_num=4),
                      cwd=tmp_path, launcher=MPIRUN, check=False)
    assert proc.returncode != 0
    assert "--device_num=4 but the launcher started 2 processes" in proc.stdout + proc.stderr


def test_run_distribute_on_cpu_without_launcher_is_refused(data, tmp_path):
    proc = run_script("train.py", tiny_flags(data, str(tmp_path / "o"), run_distribute=True, device_num=2),
                      cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --run_distribute=True on CPU needs a launcher")


def _rank_pid(rank):
    """PID of the train.py process of ``rank`` (mpirun and msrun both export the rank)."""
    for pid in subprocess.run(["pgrep", "-f", "train.py --config_path"], capture_output=True,
                              text=True).stdout.split():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env or (
                f"RANK_ID={rank}".encode() in env and b"MS_ROLE=MS_WORKER" in env):
            return int(pid)
    return None


@pytest.mark.parametrize("launcher", ["mpirun", "msrun"])
def test_a_dead_rank_stops_the_job_and_is_named(tmp_path, launcher):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=40, val_per_class=1, size=24)
    out = str(tmp_path / "out")
    cmd = (MPIRUN + [sys.executable] if launcher == "mpirun" else _msrun(str(tmp_path / "mslog"))) + \
        [os.path.join(ROOT, "train.py")] + tiny_flags(data, out, run_distribute=True, device_num=2, batch_size=4,
                                                      epoch_size=50)
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log1 = os.path.join(out, "logs", "rank_1.log")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(log1) and "step 2/" in open(log1).read()):
        time.sleep(0.5)
    pid = _rank_pid(1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    try:
        output = proc.communicate(timeout=150)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.time() - killed < 120
    if launcher == "mpirun":
        assert "process rank 1" in output and "signal 9" in output
    else:
        assert "worker 1 is the first one timed out" in output or "exit with exception. Error code: -9" in output
