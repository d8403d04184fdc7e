"""The training loop: data per epoch, steps, logs, evaluation, checkpoints, resume, signals and faults.

Design choices that matter for week-long runs:
- the training dataset is rebuilt every epoch with seed = cfg.seed + epoch, so a resumed run sees
  the same order and skips the steps already done in an interrupted epoch;
- the training step never applies non-finite gradients (loss-scale cell with overflow check), and a
  non-finite loss stops the run naming epoch and step, without writing anything;
- SIGTERM / Ctrl-C finish the current step, write a resumable latest.ckpt and exit non-zero.
"""
import os
import signal
import time

import numpy as np
import mindspore as ms

from src.checkpoint import CheckpointManager, CheckpointError, all_finite, load_network, load_train_state
from src.config import save_config
from src.errors import DataError, TrainingStopped
from src.data import BadImageMonitor, count_images, create_dataset, scan_image_folder, check_class_match
from src.data.demo import MARKER, maybe_prepare_demo
from src.distributed import init_distributed
from src.evaluate import evaluate
from src.factory import build_network, build_optimizer, build_train_step
from src.run_log import MetricsWriter, format_eta, setup_logger
from src.schedules import create_lr_schedule

# A step whose gradients overflow is skipped by the loss scaler; this many in a row means the
# run has diverged rather than the scale being too high.
MAX_CONSECUTIVE_OVERFLOWS = 50
# Test hooks: inject a fault at this global step (images multiplied by NaN); every rank dumps its
# final weights as <dir>/rank_<r>.npz (to check that data-parallel ranks stay identical).
INJECT_NAN_ENV = "ISQRT_COV_INJECT_NAN_STEP"
DUMP_WEIGHTS_ENV = "ISQRT_COV_DUMP_WEIGHTS"


DEMO_WAIT_SECONDS = 300


def _wait_for(path, seconds):
    """Other ranks wait while rank 0 writes the demo dataset."""
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TrainingStopped(f"rank 0 did not write {path} within {seconds} s")
        time.sleep(1)




def shard_samples(split_dir, classes, dist):
    """Real images of rank ``dist.rank``'s shard: MindSpore deals samples round-robin and pads
    shards to equal length with repeats, which evaluation must not count."""
    total = sum(count_images(split_dir, classes).values())
    return len(range(dist.rank, total, dist.group_size))


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.dist = init_distributed(cfg)
        self.log = setup_logger(cfg.output_path, self.dist.rank)
        self.ckpt = CheckpointManager(os.path.join(cfg.output_path, "ckpt"), cfg.keep_checkpoint_max,
                                      enabled=self.dist.is_main)
        self.metrics = MetricsWriter(cfg.output_path, enabled=self.dist.is_main)
        self.stop_signal = None
        ms.set_seed(cfg.seed)

    # ----------------------------------------------------------------- set-up
    def _prepare_data(self):
        cfg = self.cfg
        if cfg.demo_dataset and self.dist.is_main:
            maybe_prepare_demo(cfg)
        elif cfg.demo_dataset:
            _wait_for(os.path.join(cfg.data_path, MARKER), DEMO_WAIT_SECONDS)
        self.train_dir = os.path.join(cfg.data_path, "train")
        self.val_dir = os.path.join(cfg.data_path, "val")
        self.classes = scan_image_folder(self.train_dir)
        self.has_val = os.path.isdir(self.val_dir)
        if self.has_val:
            check_class_match(self.classes, scan_image_folder(self.val_dir))

    def _dataset(self, training, epoch=0):
        split = self.train_dir if training else self.val_dir
        return create_dataset(split, self.cfg, training, num_shards=self.dist.group_size,
                              shard_id=self.dist.rank, seed=self.cfg.seed + epoch)

    def _build(self):
        cfg = self.cfg
        self.net = build_network(cfg)
        if cfg.pre_trained:
            from src.checkpoint import load_pretrained
            self.log.info(load_pretrained(self.net, cfg.pre_trained))
        size = self._dataset(True).get_dataset_size()
        if size == 0:
            raise DataError(f"{self.train_dir} has fewer images per device than batch_size={cfg.batch_size}: "
                             "lower --batch_size")
        self.steps_per_epoch = min(size, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch > 0 else size
        self.lr = create_lr_schedule(cfg, self.steps_per_epoch)
        self.optimizer = build_optimizer(cfg, self.net, self.lr)
        self.train_step = build_train_step(cfg, self.net, self.optimizer)

    @property
    def _cls_prefix(self):
        return getattr(self.net, "classifier_prefix", "fc.")

    def _meta(self, epoch, step_in_epoch, top1=None):
        cfg = self.cfg
        meta = {"arch": cfg.arch, "head": cfg.head, "num_classes": int(cfg.num_classes), "epoch": int(epoch),
                "step_in_epoch": int(step_in_epoch), "best_top1": float(self.best_top1)}
        if top1 is not None:
            meta["top1"] = float(top1)
        return meta

    def _can_save(self):
        """Rank 0 writes, and never non-finite weights (one pass over the parameters)."""
        if not self.dist.is_main:
            return False
        if not all_finite(self.net):
            self.log.error("weights are not finite: checkpoints left as they were")
            return False
        return True

    # ----------------------------------------------------------------- run
    def fit(self):
        cfg = self.cfg
        self._prepare_data()
        self._build()
        self.best_top1 = -1.0
        start_epoch, start_step = 0, 0
        if cfg.resume_ckpt:
            meta = load_train_state(self.train_step, cfg.resume_ckpt, self.net, self._cls_prefix)
            start_epoch, start_step = int(meta["epoch"]), int(meta["step_in_epoch"])
            self.best_top1 = float(meta.get("best_top1", -1.0))
            if start_step >= self.steps_per_epoch:
                start_epoch, start_step = start_epoch + 1, 0
            self.log.info(f"resumed from {cfg.resume_ckpt} at epoch {start_epoch + 1} step {start_step}")
        if self.dist.is_main:
            save_config(cfg, os.path.join(self.ckpt.dir, "config.yaml"))
            self.ckpt.write_json("class_names.json", self.classes)
        n_params = sum(int(np.prod(p.shape)) for p in self.net.trainable_params())
        self.log.info(f"{cfg.arch} {cfg.head}: {n_params:,} parameters, {len(self.classes)} classes, "
                      f"{self.steps_per_epoch} steps/epoch x {cfg.epoch_size} epochs, "
                      f"{self.dist.group_size} device(s) x batch {cfg.batch_size}")
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.bad_images = BadImageMonitor().start()
        try:
            for epoch in range(start_epoch, cfg.epoch_size):
                self._train_epoch(epoch, start_step if epoch == start_epoch else 0)
        finally:
            self.bad_images.stop()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        dump = os.environ.get(DUMP_WEIGHTS_ENV)
        if dump:
            os.makedirs(dump, exist_ok=True)
            np.savez(os.path.join(dump, f"rank_{self.dist.rank}.npz"),
                     **{p.name: p.asnumpy() for p in self.net.get_parameters()})
        self.log.info(f"done: best val top-1 {100 * max(self.best_top1, 0):.2f}%, checkpoints in {self.ckpt.dir}")
        return self.best_top1

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def _train_epoch(self, epoch, first_step):
        cfg = self.cfg
        dataset = self._dataset(True, epoch)
        if first_step:
            dataset = dataset.skip(first_step)
        inject = int(os.environ.get(INJECT_NAN_ENV, -1))
        total_steps = cfg.epoch_size * self.steps_per_epoch
        batch = cfg.batch_size * self.dist.group_size
        tick, tick_step, epoch_start = time.time(), first_step, time.time()
        losses, overflows = [], 0
        step = first_step
        for step, (images, labels) in enumerate(dataset.create_tuple_iterator(num_epochs=1), start=first_step):
            if step >= self.steps_per_epoch:
                break
            global_step = epoch * self.steps_per_epoch + step
            if global_step == inject:
                images = images * float("nan")
            loss, overflow, scale = self.train_step(images, labels)
            loss, overflow = float(loss.asnumpy()), bool(overflow.asnumpy())
            if overflow:
                # Only a dynamic float16 loss scale overflows legitimately (it then lowers the scale).
                overflows += 1
                dynamic = self.train_step.scale_update is not None
                if not dynamic or (not np.isfinite(loss) and float(scale.asnumpy()) <= 1.0) \
                        or overflows >= MAX_CONSECUTIVE_OVERFLOWS:
                    raise TrainingStopped(
                        f"non-finite loss, gradients or BatchNorm statistics (loss {loss}) at epoch {epoch + 1} "
                        f"step {step + 1} (global step {global_step}): the run stopped and no checkpoint was "
                        f"written; lower --lr, check the data, or resume from {self.ckpt.latest}")
            else:
                overflows = 0
                losses.append(loss)
            if (step + 1) % cfg.log_interval == 0 or step + 1 == self.steps_per_epoch:
                now = time.time()
                ips = (step + 1 - tick_step) * batch / max(now - tick, 1e-9)
                done = global_step + 1
                eta = (total_steps - done) * (now - tick) / max(step + 1 - tick_step, 1)
                self.log.info(f"epoch {epoch + 1}/{cfg.epoch_size} step {step + 1}/{self.steps_per_epoch} "
                              f"loss {loss:.4f} lr {self.lr[global_step]:.6f} {ips:.1f} img/s eta {format_eta(eta)}")
                tick, tick_step = now, step + 1
            if self.stop_signal is not None:
                if self._can_save():
                    self.ckpt.save_latest(self.train_step, self._meta(epoch, step + 1))
                self.log.info(f"signal {self.stop_signal}: saved {self.ckpt.latest} at epoch {epoch + 1} "
                              f"step {step + 1}; continue with --resume_ckpt={self.ckpt.latest}")
                raise SystemExit(128 + self.stop_signal)
        epoch_time = time.time() - epoch_start
        bad_count, bad_new = self.bad_images.collect()
        for path in bad_new:
            self.log.warning(f"undecodable image ({cfg.bad_image_mode}d): {path}")
        if bad_count:
            self.log.warning(f"epoch {epoch + 1}: {bad_count} undecodable image(s) {cfg.bad_image_mode}d; "
                             "list them all with: python scripts/check_dataset.py DATA_PATH")
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
               "lr": float(self.lr[min((epoch + 1) * self.steps_per_epoch - 1, len(self.lr) - 1)]),
               "epoch_time": epoch_time,
               "images_per_sec": (step + 1 - first_step) * batch / max(epoch_time, 1e-9)}
        last = epoch + 1 == cfg.epoch_size
        top1 = None
        if self.has_val and ((epoch + 1) % cfg.eval_interval == 0 or last):
            m = evaluate(self.net, self._dataset(False), cfg.eval_flip_average, self.dist.distributed,
                         num_samples=shard_samples(self.val_dir, self.classes, self.dist))
            top1 = m["top1"]
            row.update(val_top1=m["top1"], val_top5=m["top5"], val_loss=m["loss"])
            self.log.info(f"epoch {epoch + 1}: val top-1 {100 * m['top1']:.2f}% top-5 {100 * m['top5']:.2f}% "
                          f"loss {m['loss']:.4f} ({m['num_images']} images)")
        improved = top1 is not None and top1 > self.best_top1
        if improved:
            self.best_top1 = top1
        if self._can_save():
            meta = self._meta(epoch, self.steps_per_epoch, top1)
            if improved or not self.has_val:  # no val set: best = last
                self.ckpt.save_best(self.net, meta)
            self.ckpt.save_latest(self.train_step, meta)
            if cfg.save_every_epochs > 0 and (epoch + 1) % cfg.save_every_epochs == 0:
                self.ckpt.save_epoch(self.net, epoch + 1, meta)
        self.metrics.add(row)
