"""Agreement between data-parallel ranks: the one way a rank-dependent fact becomes a shared decision.

A rank must never decide alone (wait for a file, stop on its own NaN, leave the loop on its own
signal): the others would wait in their next collective until the launcher kills the job. Every
decision in the training loop goes through ``Ranks``: small float vectors all-reduced over all
ranks, so each rank computes the same answer from the same numbers. In a single process every
method is the identity and costs nothing.

Waiting is safe: src.distributed sets the CPU collectives' timeout (MS_NODE_TIMEOUT) far above
the 30 s default, so a rank busy writing a checkpoint or compiling is waited for.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

from src.errors import UserError


class _AllReduce(nn.Cell):
    def __init__(self):
        super().__init__()
        self.op = ops.AllReduce()

    def construct(self, x):
        return self.op(x)


class RankFailed(UserError):
    """Another rank failed at a step all ranks take together; its own log says why."""


class Ranks:
    """Collective decisions over the ranks of ``dist`` (a src.distributed.DistInfo)."""

    def __init__(self, dist):
        self.dist = dist
        self._all_reduce = None

    def sum(self, values):
        """Element-wise sum over ranks of a float vector (exact for counts below 2^24). A sum is the
        one reduction MindSpore's CPU AllReduce has; the other decisions are built on it."""
        values = np.asarray(values, np.float32).reshape(-1)
        if not self.dist.distributed:
            return values.astype(np.float64)
        if self._all_reduce is None:
            self._all_reduce = _AllReduce()
        return self._all_reduce(ms.Tensor(values)).asnumpy().astype(np.float64)

    def any(self, flag):
        """True on every rank when ``flag`` is true on at least one."""
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def gather(self, value):
        """[value of rank 0, value of rank 1, ...] on every rank."""
        slots = np.zeros(self.dist.group_size)
        slots[self.dist.rank] = value
        return list(self.sum(slots))

    def broadcast(self, value):
        """Rank 0's ``value`` (a number) on every rank."""
        return self.gather(value)[0]

    def agree(self, what, fn):
        """Run ``fn`` on every rank and return its result, unless it raised a UserError on any rank:
        then every rank raises, the failing ones their own error and the others RankFailed naming them."""
        error = None
        try:
            result = fn()
        except UserError as exc:
            error, result = exc, None
        failed = [r for r, bad in enumerate(self.gather(1.0 if error else 0.0)) if bad]
        if error is not None:
            raise error
        if failed:
            raise RankFailed(f"{what} failed on rank {', '.join(map(str, failed))} (see logs/rank_{failed[0]}.log); "
                             "every rank stopped")
        return result
