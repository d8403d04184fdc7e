"""Which samples each rank reads in each epoch: a pure function of (seed, epoch, rank), in NumPy.

The pipeline is built once per run and reads these orders through a sampler, so the file list is
never rebuilt, a resumed run reads exactly the samples the interrupted one would have read in the
same order, and the steps already done are skipped without being decoded.

Training: epoch e permutes the readable files with ``np.random.default_rng(seed + e)``; with
bad_image_mode "replace" the places of refused files are filled by repeating the start of that
permutation (the epoch keeps its length), with "skip" they are dropped. The global order is padded
to a multiple of the rank count by wrapping around and dealt round-robin, so every rank gets the
same number of samples (equal step counts: no rank waits for another in an all-reduce), cut to whole
batches. Evaluation: the readable files in file order, dealt round-robin without padding (each image
counted once over the ranks).
"""
import numpy as np


class EpochOrder:
    """Sample indices of one rank for each epoch.

    n: files in the split (FileList order); bad: indices refused by the start-up check;
    training: shuffled, padded and cut to whole batches (else file order, every readable image);
    max_batches: at most this many batches per epoch (0 = all).
    """

    def __init__(self, n, seed=0, training=True, batch_size=1, num_shards=1, shard_id=0, bad=(), mode="replace",
                 max_batches=0):
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
        keep = np.ones(n, bool)
        keep[list(bad)] = False
        self.good = np.flatnonzero(keep).astype(np.int64)
        self.total = n if mode == "replace" and training else len(self.good)  # samples of one epoch, all ranks
        self.seed, self.training, self.batch_size = int(seed), bool(training), int(batch_size)
        self.num_shards, self.shard_id = int(num_shards), int(shard_id)
        per_rank = -(-self.total // self.num_shards) if training else len(range(shard_id, self.total, num_shards))
        self.batches = per_rank // self.batch_size if training else -(-per_rank // self.batch_size)
        if max_batches and training:
            self.batches = min(self.batches, int(max_batches))
        self.samples = min(per_rank, self.batches * self.batch_size)  # per rank and epoch

    def indices(self, epoch, skip_batches=0):
        """int64 sample indices this rank reads in ``epoch``, after the first ``skip_batches`` batches."""
        if not self.training:
            return self.good[self.shard_id::self.num_shards][skip_batches * self.batch_size:]
        if not len(self.good):
            return self.good
        order = np.random.default_rng(self.seed + int(epoch)).permutation(self.good)
        padded = np.resize(order, -(-self.total // self.num_shards) * self.num_shards)  # repeats from the start
        return padded[self.shard_id::self.num_shards][skip_batches * self.batch_size:self.samples]
