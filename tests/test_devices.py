"""The device every rank asks for, under each launcher's environment (no GPU needed: MindSpore's
set_device and init are replaced by recorders, so the test checks exactly what would be requested)."""
import pytest

import src.distributed as distributed
from src.config import load_config
from src.distributed import choose_device_id, launcher
from src.errors import DeviceError

MPIRUN = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
MSRUN = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "4"}


def _mpi(rank, local=None, **extra):
    local = rank if local is None else local
    return dict(MPIRUN, OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK=str(local), **extra)


def test_launcher_detection():
    assert launcher({}) is None
    assert launcher(_mpi(1)) == "mpirun"
    assert launcher(dict(MSRUN, RANK_ID="3")) == "msrun"


def test_mpich_is_refused_with_the_reason():
    """MindSpore's mpirun start-up needs OpenMPI: its libmpi_collective.so links libmpi.so.40 (OpenMPI's
    soname; MPICH's is libmpi.so.12) and OpenMPI's ompi_mpi_comm_world, read here from the installed wheel."""
    import os
    import subprocess
    import mindspore
    lib = os.path.join(os.path.dirname(mindspore.__file__), "lib", "libmpi_collective.so")
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    assert "[libmpi.so.40]" in needed
    symbols = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
    assert "ompi_mpi_comm_world" in symbols
    mpich = {"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALRANKID": "1"}
    with pytest.raises(DeviceError, match="needs OpenMPI .*libmpi.so.40.* OpenMPI's mpirun or with msrun"):
        launcher(mpich)
    with pytest.raises(DeviceError, match="needs OpenMPI"):
        choose_device_id("GPU", True, 0, mpich)


@pytest.mark.parametrize("rank,local", [(0, 0), (3, 3), (5, 1)])  # the last: second machine, 4 GPUs each
def test_mpirun_rank_uses_its_local_rank(rank, local):
    assert choose_device_id("GPU", True, 0, _mpi(rank, local)) == local
    assert choose_device_id("GPU", True, 7, _mpi(rank, local)) == local  # device_id is for one process


def test_msrun_lets_the_launcher_negotiate_and_one_process_uses_device_id():
    assert choose_device_id("GPU", True, 0, dict(MSRUN, RANK_ID="2")) is None
    assert choose_device_id("GPU", False, 3, {}) == 3
    assert choose_device_id("GPU", False, 3, _mpi(1)) == 3  # mpirun -n 1 without run_distribute
    assert choose_device_id("CPU", True, 0, _mpi(1)) is None


def test_cuda_visible_devices_must_cover_the_local_ranks():
    assert choose_device_id("GPU", True, 0, _mpi(1, CUDA_VISIBLE_DEVICES="4,5")) == 1  # physical GPU 5
    with pytest.raises(DeviceError, match="local rank 2 needs GPU 2 but CUDA_VISIBLE_DEVICES='4,5'"):
        choose_device_id("GPU", True, 0, _mpi(2, CUDA_VISIBLE_DEVICES="4,5"))


class _Recorder:
    """Stands in for MindSpore's device and communication calls; records their order."""

    def __init__(self, monkeypatch, rank, size):
        self.calls = []
        monkeypatch.setattr(distributed.ms, "set_device", lambda *a: self.calls.append(("set_device",) + a))
        monkeypatch.setattr(distributed, "_probe", lambda: self.calls.append(("kernel",)))
        import mindspore.communication as comm
        monkeypatch.setattr(comm, "init", lambda *a: self.calls.append(("init",)))
        monkeypatch.setattr(comm, "get_rank", lambda *a: rank)
        monkeypatch.setattr(comm, "get_group_size", lambda *a: size)
        monkeypatch.setattr(distributed.ms, "set_auto_parallel_context", lambda **kw: None)
        monkeypatch.setattr(distributed.ms, "reset_auto_parallel_context", lambda: None)


@pytest.mark.parametrize("env,expected", [
    (_mpi(2), ("set_device", "GPU", 2)),
    (dict(MSRUN, RANK_ID="2"), ("set_device", "GPU")),
])
def test_init_distributed_requests_the_rank_device_and_runs_no_kernel_before_init(monkeypatch, env, expected):
    for key in list(MPIRUN) + list(MSRUN) + ["OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "RANK_ID"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rec = _Recorder(monkeypatch, rank=2, size=4)
    cfg = load_config(["--device_target=GPU", "--run_distribute=True", "--device_num=4"])
    info = distributed.init_distributed(cfg)
    assert (info.rank, info.group_size, info.distributed) == (2, 4, True)
    assert rec.calls == [expected, ("init",), ("kernel",)]


def test_single_process_probes_the_device_it_asked_for(monkeypatch):
    rec = _Recorder(monkeypatch, rank=0, size=1)
    info = distributed.init_distributed(load_config(["--device_target=GPU", "--device_id=3"]))
    assert not info.distributed and rec.calls == [("set_device", "GPU", 3), ("kernel",)]
