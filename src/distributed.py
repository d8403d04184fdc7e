"""One place that sets the device and, for --run_distribute=True, initialises collective communication.

Launchers: ``mpirun`` (GPU: NCCL; Ascend: HCCL), ``msrun`` (any device, CPU included) and, on CPU
under ``mpirun``, MindSpore's dynamic cluster started from the MPI ranks (MindSpore's own mpirun
start-up supports GPU and Ascend only): rank 0 starts the scheduler process and MPI broadcasts its
address, then every rank joins as a worker. Rank and group size always come from MindSpore.
"""
import atexit
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import mindspore as ms

from src.errors import DeviceError, first_line


@dataclass
class DistInfo:
    rank: int = 0
    group_size: int = 1
    distributed: bool = False

    @property
    def is_main(self):
        return self.rank == 0


def launcher(env=None):
    """The launcher that started this process: "msrun", "mpirun" or None.

    msrun exports MS_ROLE to its workers; OpenMPI's mpirun exports OMPI_COMM_WORLD_*. MPICH's (and
    Intel MPI's) mpirun, recognised by PMI_SIZE, is refused: MindSpore's mpirun start-up loads
    lib/libmpi_collective.so, which links OpenMPI's libmpi.so.40 and its ompi_mpi_* symbols.
    Read before this module joins MindSpore's cluster itself (which sets MS_ROLE under mpirun on CPU).
    """
    env = os.environ if env is None else env
    if _MPI_COMM is not None:
        return "mpirun"
    if "MS_ROLE" in env:
        return "msrun"
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpirun"
    if "PMI_SIZE" in env:
        raise DeviceError("this mpirun is not OpenMPI's (PMI_SIZE without OMPI_COMM_WORLD_SIZE): MindSpore's "
                          "mpirun start-up needs OpenMPI (its libmpi_collective.so links libmpi.so.40); launch "
                          "with OpenMPI's mpirun or with msrun")
    return None


def local_rank_count(env=None):
    """Processes of this job on this machine: mpirun's OMPI_COMM_WORLD_LOCAL_SIZE (OpenMPI) or
    MPI_LOCALNRANKS (MPICH); under msrun (which exports no such variable) MindSpore's count once
    communication is initialised; else 1. The data pipelines divide the machine's cores by it."""
    env = os.environ if env is None else env
    for key in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if key in env:
            return max(1, int(env[key]))
    from mindspore.communication.management import GlobalComm
    if GlobalComm.INITED:
        from mindspore.communication import get_local_rank_size
        return max(1, int(get_local_rank_size()))
    return 1


def choose_device_id(device_target, run_distribute, device_id, env=None):
    """The device id this process asks MindSpore for (None: MindSpore chooses).

    - CPU, or msrun: None. msrun negotiates the ids of its workers (mindspore.set_device's docstring).
    - mpirun: the local rank. Importing mindspore.communication also sets it, but an explicit
      set_device(target, 0) would override that for every rank, so it is passed explicitly.
    - one process: ``device_id``.
    Ids index the GPUs CUDA_VISIBLE_DEVICES leaves visible: with CUDA_VISIBLE_DEVICES=4,5,6,7 local
    rank 0 runs on physical GPU 4.
    """
    env = os.environ if env is None else env
    if device_target == "CPU":
        return None
    if not run_distribute:
        return int(device_id)
    how = launcher(env)
    if how == "msrun":
        return None
    if how == "mpirun":
        if "OMPI_COMM_WORLD_LOCAL_RANK" not in env:
            raise DeviceError("mpirun did not say which local rank this process is (no OMPI_COMM_WORLD_LOCAL_RANK): "
                              "launch with OpenMPI's mpirun, or with msrun")
        local = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if device_target == "GPU" and "CUDA_VISIBLE_DEVICES" in env and local >= len(visible):
            raise DeviceError(f"local rank {local} needs GPU {local} but CUDA_VISIBLE_DEVICES="
                              f"'{env['CUDA_VISIBLE_DEVICES']}' leaves {len(visible)} visible: start at most "
                              f"{len(visible)} processes per machine, or widen CUDA_VISIBLE_DEVICES")
        return local
    return int(device_id)


def set_device(device_target, device_id=0, mode="GRAPH", probe=True):
    """Select the device (``device_id`` None: MindSpore's choice) and the execution mode.

    ``probe`` runs one tiny kernel so that a missing device fails here, with one clear line. A
    distributed run probes only after ``init()``: no kernel may run before it.
    """
    device_target = str(device_target)
    if device_target not in ("CPU", "GPU", "Ascend"):
        raise DeviceError(f"device_target must be CPU, GPU or Ascend, got '{device_target}'")
    ms.set_context(mode=ms.GRAPH_MODE if str(mode).upper() == "GRAPH" else ms.PYNATIVE_MODE)
    try:
        if device_id is None:
            ms.set_device(device_target)
        else:
            ms.set_device(device_target, int(device_id))
        if probe:
            _probe()
    except RuntimeError as exc:
        raise _unavailable(device_target, exc) from None


def _probe():
    ms.Tensor([1.0]) + 1  # the device loads lazily: force it here so the error is ours


def _unavailable(device_target, exc):
    return DeviceError(f"device_target {device_target} is not available here ({first_line(exc)}). Use "
                       "--device_target=CPU, or install the CUDA 11.6 + cuDNN 8 set-up of docs/gpu.md")


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


SCHEDULER_CODE = "from mindspore.communication import init; init()"  # what rank 0's scheduler runs
_SCHEDULER = None  # rank 0's scheduler process (CPU under mpirun)
_MPI_COMM = None  # set when this process joined the cluster through MPI


def _start_cpu_cluster_from_mpi():
    """Join MindSpore's dynamic cluster from MPI ranks; rank 0 also runs the scheduler process."""
    global _SCHEDULER, _MPI_COMM
    try:
        from mpi4py import MPI
    except ImportError:
        raise DeviceError("mpirun on CPU needs mpi4py (pip install mpi4py), or launch with msrun") from None
    comm = _MPI_COMM = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    address = None
    if rank == 0:
        host = os.environ.get("MS_SCHED_HOST") or socket.gethostbyname(socket.gethostname())
        if size == int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", size)):
            host = "127.0.0.1"  # all ranks on this machine
        address = (host, int(os.environ.get("MS_SCHED_PORT") or _free_port()))
    host, port = comm.bcast(address, root=0)
    common = {"MS_WORKER_NUM": str(size), "MS_SCHED_HOST": host, "MS_SCHED_PORT": str(port)}
    if rank == 0:
        env = dict(os.environ, MS_ROLE="MS_SCHED", **common)
        for key in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
            del env[key]  # the scheduler is not an MPI process
        _SCHEDULER = subprocess.Popen(
            [sys.executable, "-c", SCHEDULER_CODE], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(_stop_scheduler)  # also when rank 0 ends with a traceback
        _wait_listening(host, port, _SCHEDULER)
    # Workers that dial before the scheduler listens fall into MindSpore's slow reconnect loop
    # (25-60 s here): everyone waits for rank 0 to see the scheduler's port open.
    comm.Barrier()
    os.environ.update(common, MS_ROLE="MS_WORKER", MS_NODE_ID=str(rank))


def _wait_listening(host, port, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise DeviceError(f"MindSpore's scheduler process exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeviceError(f"MindSpore's scheduler did not open {host}:{port} within {seconds} s")


EXIT_WAIT_S = 120


def exit_process(code=0):
    """End a finished run with ``code``.

    Under mpirun on CPU, MindSpore 2.8's cluster teardown at interpreter exit killed rank 1 with
    SIGSEGV (in libmindspore_cluster) in about 1 exit in 5 on a loaded machine, turning a finished
    run into mpirun exit 139; msrun's exits never crashed. So these ranks wait for each other (rank 0
    may still be writing checkpoints), flush their logs, finalise MPI and leave without that teardown;
    rank 0 then stops its scheduler process. Every other process exits normally.
    """
    if _MPI_COMM is None:
        sys.exit(code)
    # A rank that fails alone must still leave: wait for the others a bounded time only.
    request, deadline = _MPI_COMM.Ibarrier(), time.time() + EXIT_WAIT_S
    while not request.Test() and time.time() < deadline:
        time.sleep(0.05)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if request.Test():
        from mpi4py import MPI
        MPI.Finalize()
    _stop_scheduler()
    os._exit(code)


def _stop_scheduler():
    if _SCHEDULER is not None and _SCHEDULER.poll() is None:
        _SCHEDULER.kill()
        _SCHEDULER.wait()


# MindSpore's CPU collectives give up after MS_NODE_TIMEOUT seconds of waiting for a peer (30 by
# default), shorter than a rank-0 checkpoint write or a compilation skew can take. The same variable
# is the cluster's heartbeat timeout when init() reads it, and a long one there keeps msrun waiting
# for a dead rank; the collectives read it at their first use, so it is set between the two.
# NCCL waits as is.
CPU_COLLECTIVE_TIMEOUT_S = 1800


def init_distributed(cfg):
    """Set the device, then (with cfg.run_distribute) initialise communication once and data parallelism."""
    device_id = choose_device_id(cfg.device_target, cfg.run_distribute, cfg.device_id)
    set_device(cfg.device_target, device_id, cfg.mode, probe=not cfg.run_distribute)
    if not cfg.run_distribute:
        return DistInfo()
    how = launcher()
    if how is None and cfg.device_target == "CPU":
        raise DeviceError("--run_distribute=True on CPU needs a launcher: msrun --worker_num=N "
                          "--local_worker_num=N train.py ..., or mpirun -n N python train.py ...")
    if cfg.device_target == "CPU" and how == "mpirun":
        _start_cpu_cluster_from_mpi()
    user_timeout = os.environ.get("MS_NODE_TIMEOUT")
    from mindspore.communication import init, get_rank, get_group_size
    try:
        init()
    except RuntimeError as exc:
        first = first_line(exc)
        if os.environ.get("MS_ROLE") == "MS_SCHED":  # msrun's scheduler returns here when the job ends
            raise DeviceError(f"the distributed job failed ({first})") from None
        raise DeviceError(f"collective communication failed to start ({first}); launch with mpirun or "
                          "msrun (see scripts/run_distribute_train_gpu.sh)") from None
    if cfg.device_target == "CPU" and user_timeout is None:
        os.environ["MS_NODE_TIMEOUT"] = str(CPU_COLLECTIVE_TIMEOUT_S)
    try:
        _probe()
    except RuntimeError as exc:
        raise _unavailable(cfg.device_target, exc) from None
    rank, group_size = get_rank(), get_group_size()
    if cfg.device_num != group_size:
        raise DeviceError(f"--device_num={cfg.device_num} but the launcher started {group_size} processes: "
                          f"pass --device_num={group_size} (or start {cfg.device_num} processes)")
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return DistInfo(rank=rank, group_size=group_size, distributed=True)


def split_gradient_fusion(net):
    """Fuse the gradient all-reduce in groups the backward completes one after another, so that
    exchanging one group overlaps computing the next (the model zoo's ``all_reduce_fusion_config``,
    e.g. [85, 160] for ResNet-50, set per backbone here): the head (representation + classifier),
    the last backbone stage, the one before, and the rest. ``Parameter.comm_fusion`` carries the
    group; nn.DistributedGradReducer gives each gradient's AllReduce that fusion id and the backend
    fuses the AllReduces of one id into one. Without it every gradient shares id 1: one all-reduce
    of all 57M values that starts after the whole backward. A network without backbone stages and
    a head keeps MindSpore's single group. Returns the number of parameters of each group, head first.
    """
    from src.freezing import backbone_stages  # the stages freeze_layers counts
    try:
        stages = [[p for p in stage if p.requires_grad] for stage in backbone_stages(net)]
        head = [p for cell in (net.representation, net.classifier) for p in cell.trainable_params()]
    except AttributeError:
        return [len(net.trainable_params())]
    rest = [p for stage in stages[:-2] for p in stage]
    groups = [g for g in (head, stages[-1], stages[-2] if len(stages) > 1 else [], rest) if g]
    for fusion_id, group in enumerate(groups, start=2):  # 1: MindSpore's default, left to the others
        for p in group:
            p.comm_fusion = fusion_id
    return [len(g) for g in groups]
