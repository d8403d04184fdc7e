"""Data parallelism on CPU: mpirun (the seed's launcher) and msrun, two processes each."""
import os
import random
import signal
import time
import subprocess
import sys

import numpy as np
import pytest

from src.distributed import SCHEDULER_CODE
from tests.helpers import ENV, ROOT, make_image_folder, run_script, tiny_flags

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


def _worker(data, out, launcher, distributed, tmp_path):
    cmd = list(launcher) + [sys.executable if not launcher or launcher[0] == "mpirun" else ""]
    cmd = [c for c in cmd if c] + [os.path.join(ROOT, "tests", "dist_worker.py"), data, out, str(distributed),
                                   "2" if distributed else "1"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_no_bn_network_matches_single_process_under_mpirun_and_msrun(data, tmp_path):
    single, mpi, ms_out = (str(tmp_path / n) for n in ("single", "mpi", "msrun"))
    _worker(data, single, (), False, tmp_path)
    _worker(data, mpi, MPIRUN, True, tmp_path)
    _worker(data, ms_out, _msrun(str(tmp_path / "mslog")), True, tmp_path)
    ref = _load(os.path.join(single, "rank_0.npz"))
    for out in (mpi, ms_out):
        r0, r1 = _load(os.path.join(out, "rank_0.npz")), _load(os.path.join(out, "rank_1.npz"))
        _assert_same(r0, r1, 0, 0)  # all-reduced gradients: bit-identical ranks
        _assert_same(r0, ref, 1e-4, 1e-6)  # = one process over the same global batch
    moved = max(np.abs(ref[k] - v).max() for k, v in _load(os.path.join(mpi, "rank_0.npz")).items())
    assert moved < 1e-4


def _train_distributed(data, out, launcher, tmp_path, extra=()):
    dump = os.path.join(out, "weights")
    args = tiny_flags(data, out, run_distribute=True, device_num=2, epoch_size=1, batch_size=4) + list(extra)
    return run_script("train.py", args, cwd=tmp_path, launcher=launcher,
                      env={"ISQRT_COV_DUMP_WEIGHTS": dump}), dump


@pytest.mark.parametrize("launcher", ["mpirun", "msrun"])
def test_train_py_data_parallel(data, tmp_path, launcher):
    out = str(tmp_path / "out")
    cmd = MPIRUN if launcher == "mpirun" else _msrun(str(tmp_path / "mslog"))
    _, dump = _train_distributed(data, out, cmd, tmp_path)
    r0, r1 = _load(os.path.join(dump, "rank_0.npz")), _load(os.path.join(dump, "rank_1.npz"))
    trained = [k for k in r0 if not k.endswith(("moving_mean", "moving_variance"))]
    _assert_same(r0, r1, 0, 0, trained)  # BN running statistics are per device, the weights are not
    assert os.path.isfile(os.path.join(out, "logs", "rank_0.log"))
    assert os.path.isfile(os.path.join(out, "logs", "rank_1.log"))
    assert os.path.isfile(os.path.join(out, "ckpt", "latest.ckpt"))
    log0 = open(os.path.join(out, "logs", "rank_0.log")).read()
    assert "2 device(s) x batch 4" in log0 and "val top-1" in log0
    if launcher == "mpirun":  # rank 0 stops the scheduler it started (src.distributed.exit_process)
        left = subprocess.run(["pgrep", "-f", SCHEDULER_CODE],
                              capture_output=True, text=True)
        assert left.stdout.strip() == "", left.stdout


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


SCRIPTS = {
    "run_distribute_train_gpu.sh": "DATA_PATH CONFIG_PATH DEVICE_NUM [RESUME_CKPT]",
    "run_standalone_train_gpu.sh": "DATA_PATH CONFIG_PATH [RESUME_CKPT]",
    "run_eval_gpu.sh": "DATA_PATH CHECKPOINT_PATH CONFIG_PATH",
    "run_distribute_train_cpu.sh": "DATA_PATH CONFIG_PATH WORKER_NUM",
    "run_finetune_gpu.sh": "DATA_PATH CONFIG_PATH PRETRAINED_CKPT [DEVICE_NUM]",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_launcher_scripts_check_their_arguments(script, tmp_path, data):
    path = os.path.join(ROOT, "scripts", script)
    proc = subprocess.run(["bash", path], capture_output=True, text=True)
    assert proc.returncode == 1 and SCRIPTS[script] in proc.stdout
    config = os.path.join(ROOT, "config", "resnet50_imagenet2012_config.yaml")
    required = [w for w in SCRIPTS[script].split() if not w.startswith("[")]
    bad = subprocess.run(["bash", path] + [str(tmp_path / "missing"), config, config][:len(required)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "is not a folder" in bad.stdout
    if "DEVICE_NUM" in SCRIPTS[script] or "WORKER_NUM" in SCRIPTS[script]:
        args = {"run_distribute_train_gpu.sh": [data, config, "two"], "run_distribute_train_cpu.sh": [data, config, "0"],
                "run_finetune_gpu.sh": [data, config, config, "x"]}[script]
        nan = subprocess.run(["bash", path] + args, capture_output=True, text=True)
        assert nan.returncode == 1 and "not a positive integer" in nan.stdout


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
