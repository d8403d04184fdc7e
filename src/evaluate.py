"""Top-1 / top-5 / loss over a dataset, optionally averaging the logits of each image and its
horizontal flip; sharded over ranks with the sums all-reduced."""
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from src.data import pipeline_errors


class EvalNet(nn.Cell):
    """Eval-mode logits (float32), averaged with the flipped image's when ``flip_average``.

    Images as the network takes them (build_network: uint8 0-255); the mirror image is made in
    float32 (0-255 values are exact), so no uint8 reverse kernel is needed on any device."""

    def __init__(self, net, flip_average=False):
        super().__init__(auto_prefix=False)
        self.net = net
        self.flip_average = flip_average

    def construct(self, images):
        logits = ops.cast(self.net(images), ms.float32)
        if self.flip_average:
            mirror = ops.flip(ops.cast(images, ms.float32), (3,))
            logits = 0.5 * (logits + ops.cast(self.net(mirror), ms.float32))
        return logits


def batch_stats(logits, labels):
    """(loss sum, top-1 hits, top-5 hits) of one batch, in float64 on the host."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_prob[np.arange(len(labels)), labels].sum()
    k = min(5, logits.shape[1])
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    top1 = (logits.argmax(axis=1) == labels).sum()
    top5 = (topk == labels[:, None]).any(axis=1).sum()
    return np.array([loss, top1, top5, len(labels)], np.float64)


def _add_batch(totals, logits, labels, num_samples):
    if num_samples is not None:  # drop the repeats that pad this rank's shard
        keep = max(0, min(len(labels), num_samples - int(totals[3])))
        logits, labels = logits[:keep], labels[:keep]
    return totals + batch_stats(logits, labels) if len(labels) else totals


def evaluate(eval_net, dataset, ranks=None, progress=False, num_samples=None):
    """Metrics as fractions: {'top1', 'top5', 'loss', 'num_images'} over the whole dataset.

    ``eval_net``: an EvalNet, built once per run (each new one compiles again). ``dataset``: a
    src.data.FolderPipeline (its next epoch is read). ``ranks``: a src.ranks.Ranks whose sum combines
    the shards of a data-parallel run. ``num_samples``: count only the first this many images of this
    rank's stream (a safeguard: evaluation shards are not padded)."""
    net = eval_net.net
    net.set_train(False)
    totals = np.zeros(4, np.float64)
    steps = dataset.get_dataset_size()
    start = time.time()
    with pipeline_errors():
        for i, (images, labels) in enumerate(dataset.epoch()):
            totals = _add_batch(totals, eval_net(images).asnumpy(), labels.asnumpy().astype(np.int64), num_samples)
            if progress:
                _progress(i + 1, steps, start)
    if ranks is not None:
        totals = ranks.sum(totals)
    net.set_train(True)
    n = max(totals[3], 1.0)
    return {"top1": totals[1] / n, "top5": totals[2] / n, "loss": totals[0] / n, "num_images": int(totals[3])}


def _progress(done, total, start, width=30):
    frac = done / max(total, 1)
    rate = done / max(time.time() - start, 1e-9)
    bar = "#" * int(width * frac) + "." * (width - int(width * frac))
    sys.stderr.write(f"\r[{bar}] {done}/{total} batches {rate:.1f} it/s")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
