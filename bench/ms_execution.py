"""Run a small benchmark graph the way MindSpore runs a network's graph: on its actor threads.

MindSpore 2.8 runs a graph of at most 100 kernels in the calling Python thread ("single-thread
execution", picked after the first run; `GLOG_v=1` logs "in multi thread or not: 0"), and the
Python thread then spin-waits (sched_yield) for the kernel threads. On this 2-core machine that third
busy thread made such graphs bimodal: 240-260 ms or 300-380 ms for the meta-layer (0.1-0.25 s
of system time in the slow runs), 5.3-8.6 ms per product for a chain of BatchMatMuls. A training
network (thousands of kernels) is always executed on the actor threads, so a benchmark of one of
its parts must be too: `MultiThreadExecution` appends a chain of cheap one-element kernels that
lifts the graph above the limit without touching its outputs.
"""
import numpy as np
from mindspore import nn, ops, Parameter, Tensor

from timing import time_round_robin

SINGLE_THREAD_MAX_KERNELS = 100  # MindSpore's ActorDispatcher::kSingleThreadExecutionActorMaxNum


class MultiThreadExecution(nn.Cell):
    """``cell``'s graph plus ``extra_kernels`` Sin kernels on a 1-element Parameter, kept alive by a
    Depend on the output (Sin chains are not simplified away, and the Parameter is not a constant)."""

    def __init__(self, cell, extra_kernels=SINGLE_THREAD_MAX_KERNELS + 1):
        super().__init__()
        self.cell = cell
        self.extra_kernels = extra_kernels
        self.tail = Parameter(Tensor(np.zeros(1, np.float32)), name="execution_tail", requires_grad=False)

    def construct(self, *inputs):
        out = self.cell(*inputs)
        s = self.tail
        for _ in range(self.extra_kernels):
            s = ops.sin(s)
        return ops.depend(out, s)


def tail_cost(repeats=20):
    """Seconds one run of the extra kernels alone takes (median): what the wrapper adds to a time."""
    cell = MultiThreadExecution(nn.Identity())
    x = Tensor(np.zeros(1, np.float32))
    times = time_round_robin({"tail": lambda: cell(x).asnumpy()}, warmup=1, repeats=repeats, settle=0)
    return float(np.median(times["tail"]))
