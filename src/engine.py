"""The training loop: data per epoch, steps, logs, evaluation, checkpoints, resume, signals and faults.

Design choices that matter for week-long runs on many devices:
- Ranks decide together. Whatever depends on one rank (the demo data written, the folders found,
  a non-finite step, a signal, a checkpoint written) becomes a decision of all ranks through
  src.ranks.Ranks or the all-reduced control vector of the training step, never a file to wait
  for: no rank leaves the loop, skips a step or stops alone.
- No per-step host synchronisation. The step returns device tensors; the loop reads the previous
  step's control vector while the current step runs (the device queue never drains), a
  loss only at log intervals, and the epoch's losses once at its end.
- The data is listed and its files checked once per run (src/data/run_data.py); each split's
  pipeline lives for the whole run and reads epoch e in the order seeded by cfg.seed + e, so a
  resumed run reads the same images in the same order and skips the steps already done unread.
- Resume restores weights, momentum, loss scale, epoch and step; the learning-rate schedule is
  always rebuilt from the current config (so epoch_size can be extended).
"""
import os
import signal
import time

import numpy as np
import mindspore as ms

from src.checkpoint import CheckpointManager, all_finite, load_pretrained, load_train_state
from src.config import save_config
from src.data import pipeline_errors
from src.data.run_data import RunData
from src.distributed import init_distributed, local_rank_count
from src.errors import CheckpointError, DataError, TrainingStopped
from src.evaluate import EvalNet, evaluate
from src.freezing import freeze_layers, start_epoch_stage
from src.factory import build_network, build_optimizer, build_train_step
from src.ranks import Ranks
from src.run_env import record_environment
from src.run_log import MetricsWriter, format_eta, setup_logger
from src.schedules import create_lr_schedule
from src.train_step import micro_batches

# A step whose gradients overflow is skipped by the loss scaler; this many in a row means the
# run has diverged rather than the scale being too high.
MAX_CONSECUTIVE_OVERFLOWS = 50
# Signals that stop a run after the current step with a resumable latest.ckpt. SIGUSR1 because
# mpirun forwards it to every rank and waits, while on SIGTERM it kills the ranks a second later.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.dist = init_distributed(cfg)
        self.ranks = Ranks(self.dist)
        self.log = setup_logger(cfg.output_path, self.dist.rank)
        self.ckpt = CheckpointManager(os.path.join(cfg.output_path, "ckpt"), cfg.keep_checkpoint_max,
                                      enabled=self.dist.is_main)
        self.metrics = MetricsWriter(cfg.output_path, enabled=self.dist.is_main)
        self.stop_signal = 0
        self.best_top1 = -1.0
        self._overflows = 0  # consecutive overflowing steps
        self.accumulation = cfg.grad_accumulation_steps  # micro-batches per update; steps count updates
        self.global_batch = cfg.batch_size * self.dist.group_size * self.accumulation  # images per update
        self.data = RunData(cfg, self.dist, self.ranks, self.log, local_rank_count())
        ms.set_seed(cfg.seed)

    # ----------------------------------------------------------------- set-up (agreed by all ranks)
    def _on_main(self, what, fn):
        """Work rank 0 does alone (writing files), followed by an agreement that it succeeded."""
        return self.ranks.agree(what, fn if self.dist.is_main else lambda: None)

    def _dataset(self, training):
        """The split's pipeline (one seam, which tests/hooks.py wraps to inject faults)."""
        return self.data.pipeline(training)

    def _build(self):
        cfg = self.cfg
        self.net = build_network(cfg)
        if cfg.pre_trained:
            self.log.info(load_pretrained(self.net, cfg.pre_trained))
        if cfg.freeze_layers:  # before the optimizer: frozen parameters are not among its weights
            self.log.info(freeze_layers(self.net, cfg.freeze_layers))
        size = self._dataset(True).get_dataset_size() // self.accumulation
        if size == 0:
            raise DataError(f"{self.data.train_dir} has fewer images per device than batch_size={cfg.batch_size} x "
                            f"grad_accumulation_steps={self.accumulation}: lower --batch_size")
        self.steps_per_epoch = min(size, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch > 0 else size
        self.lr = create_lr_schedule(cfg, self.steps_per_epoch)
        self.optimizer = build_optimizer(cfg, self.net, self.lr)
        self.train_step = build_train_step(cfg, self.net, self.optimizer)
        self.eval_net = EvalNet(self.net, cfg.eval_flip_average)  # compiled once per run
        self._stop_values = {}

    def _resume(self):
        """(epoch, step) to start at; the lr schedule stays the current config's."""
        cfg, spe = self.cfg, self.steps_per_epoch
        meta = load_train_state(self.train_step, cfg.resume_ckpt, self.net)
        epoch, step = int(meta["epoch"]), int(meta["step_in_epoch"])
        saved = (int(meta.get("steps_per_epoch", spe)), int(meta.get("global_batch", self.global_batch)))
        if step >= saved[0]:
            epoch, step = epoch + 1, 0  # an epoch boundary is a boundary for any sharding
        elif saved != (spe, self.global_batch):
            raise CheckpointError(
                f"{cfg.resume_ckpt} stopped inside epoch {epoch + 1} (step {step} of {saved[0]}, total batch "
                f"{saved[1]}) but this run has {spe} steps of total batch {self.global_batch}: resume with the "
                "--device_num and --batch_size it was written with, or use --pre_trained to keep only its weights")
        self.best_top1 = float(meta.get("best_top1", -1.0))
        self.optimizer.global_step.set_data(ms.Tensor([epoch * spe + step], ms.int32))
        self.train_step.reset_cache()  # the loaded statistics are the ones to fall back on
        return epoch, step

    # ----------------------------------------------------------------- run
    def fit(self):
        """Train to cfg.epoch_size; returns the exit code (0, or 128 + signal when stopped by one)."""
        cfg = self.cfg
        self.data.prepare()
        self.ranks.agree("building the network", self._build)
        start_epoch, start_step = 0, 0
        if cfg.resume_ckpt:
            start_epoch, start_step = self.ranks.agree("loading --resume_ckpt", self._resume)
            if start_epoch >= cfg.epoch_size:
                self.log.info(f"{cfg.resume_ckpt} has finished epoch {start_epoch} and epoch_size is {cfg.epoch_size}: "
                              "nothing to train (raise --epoch_size to train longer)")
                return 0
            self.log.info(f"resumed from {cfg.resume_ckpt} at epoch {start_epoch + 1} step {start_step}")
        self._on_main("writing the run's configuration", self._save_run_files)
        n_params = sum(int(np.prod(p.shape)) for p in self.net.trainable_params())
        self.log.info(f"{cfg.arch} {cfg.head}: {n_params:,} parameters, {len(self.data.classes)} classes, "
                      f"{self.steps_per_epoch} steps/epoch x {cfg.epoch_size} epochs, "
                      f"{self.dist.group_size} device(s) x batch {cfg.batch_size}")
        old_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        code = 0
        try:
            for epoch in range(start_epoch, cfg.epoch_size):
                code = self._train_epoch(epoch, start_step if epoch == start_epoch else 0)
                if code:
                    break
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if not code:
            self.log.info(f"done: best val top-1 {100 * max(self.best_top1, 0):.2f}%, checkpoints in {self.ckpt.dir}")
        return code

    def _save_run_files(self):
        save_config(self.cfg, os.path.join(self.ckpt.dir, "config.yaml"))
        self.ckpt.write_json("class_names.json", self.data.classes)
        record_environment(self.ckpt.dir, self.cfg, self.dist.group_size)  # for scripts/model_description.py
        for path in self.ckpt.removed_temporaries:
            self.log.info(f"removed {path}, left by a process killed while writing")
        for line in self.data.unread_file_lines():
            self.log.warning(line)

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def _stop_tensor(self):
        # The step all-reduces every rank's request; a constant per value keeps the host copy cheap.
        s = self.stop_signal
        if s not in self._stop_values:
            self._stop_values[s] = ms.Tensor(float(s), ms.float32)
        return self._stop_values[s]

    def _meta(self, epoch, step_in_epoch, top1=None):
        cfg = self.cfg
        meta = {"arch": cfg.arch, "head": cfg.head, "num_classes": int(cfg.num_classes), "epoch": int(epoch),
                "step_in_epoch": int(step_in_epoch), "best_top1": float(self.best_top1),
                "steps_per_epoch": int(self.steps_per_epoch), "global_batch": int(self.global_batch)}
        if top1 is not None:
            meta["top1"] = float(top1)
        return meta

    def _finite_weights(self):
        if all_finite(self.net):
            return True
        self.log.error("weights are not finite: checkpoints left as they were")
        return False

    def _train_epoch(self, epoch, first_step):
        cfg, spe = self.cfg, self.steps_per_epoch
        stage = start_epoch_stage(cfg, self.net, self.optimizer, epoch, first_step)  # freeze_backbone_epochs
        if stage:
            self.log.info(stage)
        self._tick = (time.time(), first_step)
        epoch_start = time.time()
        losses, applied, pending, stop = [], [], None, 0
        step = first_step - 1
        batches = self._dataset(True).epoch(epoch, first_step * self.accumulation)
        batches = enumerate(micro_batches(batches, self.accumulation), start=first_step)
        with pipeline_errors():
            for step, micro in batches:
                if step >= spe:
                    step -= 1
                    break
                out = self.train_step.run(micro, self._stop_tensor())
                if pending is not None:  # the previous step's control, read while this one runs
                    stop = self._check(pending, epoch, step - 1, applied)
                pending = out[1]
                losses.append(out[0])
                if (step + 1) % cfg.log_interval == 0 or step + 1 == spe:
                    self._log_step(epoch, step, float(out[0].asnumpy()))
                if stop:
                    break
        if pending is not None:  # the last step's control
            stop = self._check(pending, epoch, step, applied) or stop
        done = step + 1
        if stop and done < spe:
            self._on_main("saving latest.ckpt", lambda: self._finite_weights() and
                          self.ckpt.save_latest(self.train_step.training_state(), self._meta(epoch, done)))
            self.log.info(f"signal {stop}: saved {self.ckpt.latest} at epoch {epoch + 1} step {done}; "
                          f"continue with --resume_ckpt={self.ckpt.latest}")
            return 128 + stop
        self._end_epoch(epoch, time.time() - epoch_start, losses, applied, done - first_step)
        if stop:
            self.log.info(f"signal {stop}: stopped after epoch {epoch + 1}; continue with "
                          f"--resume_ckpt={self.ckpt.latest}")
            return 128 + stop
        return 0

    def _check(self, control, epoch, step, applied):
        """Act on a step's control vector (the same on every rank); returns the agreed stop signal."""
        overflow, stop, scale, poisoned = (float(v) for v in control.asnumpy())
        applied.append(not overflow)
        if poisoned:  # this rank's BatchNorm statistics went non-finite: back to the last finite ones
            self.train_step.restore_statistics()
            self.log.warning(f"epoch {epoch + 1} step {step + 1}: non-finite BatchNorm statistics restored")
        if not overflow:
            self._overflows = 0
            return int(stop)
        self._overflows += 1
        dynamic = self.train_step.scale_update is not None
        where = f"epoch {epoch + 1} step {step + 1} (global step {epoch * self.steps_per_epoch + step})"
        # float16: skip and go on, as MindSpore's loss-scale wrappers do, until MAX in a row (or a
        # dynamic scale already at 1); float32 (O0): a non-finite step is divergence, stop at once.
        if not self.train_step.float16 or (dynamic and scale <= 1.0) or \
                self._overflows >= MAX_CONSECUTIVE_OVERFLOWS:
            why = "non-finite loss, gradients or BatchNorm statistics" if not self.train_step.float16 else \
                f"{self._overflows} overflowing step(s) in a row, loss scale {scale:g}"
            raise TrainingStopped(f"{why} at {where} on at least one rank: the run stopped and no checkpoint "
                                  f"was written; lower --lr, check the data, or resume from {self.ckpt.latest}")
        change = f"loss scale {scale:g} -> {scale / 2:g}" if dynamic else f"fixed loss scale {scale:g}"
        self.log.warning(f"{where}: overflow, step skipped on every rank ({change}), "
                         f"{self._overflows} in a row")
        return int(stop)

    def _log_step(self, epoch, step, loss):
        cfg, spe = self.cfg, self.steps_per_epoch
        now, (tick, tick_step) = time.time(), self._tick
        ips = (step + 1 - tick_step) * self.global_batch / max(now - tick, 1e-9)
        global_step = epoch * spe + step
        eta = (cfg.epoch_size * spe - global_step - 1) * (now - tick) / max(step + 1 - tick_step, 1)
        self.log.info(f"epoch {epoch + 1}/{cfg.epoch_size} step {step + 1}/{spe} loss {loss:.4f} "
                      f"lr {self.lr[global_step]:.6f} {ips:.1f} img/s eta {format_eta(eta)}")
        self._tick = (now, step + 1)

    def _end_epoch(self, epoch, epoch_time, losses, applied, steps):
        cfg, spe = self.cfg, self.steps_per_epoch
        kept = [float(v) for v, ok in zip(ms.ops.stack(losses).asnumpy(), applied) if ok] if losses else []
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(kept)) if kept else None,
               "lr": float(self.lr[min((epoch + 1) * spe - 1, len(self.lr) - 1)]), "epoch_time": epoch_time,
               "images_per_sec": steps * self.global_batch / max(epoch_time, 1e-9)}
        top1 = None
        if self.data.has_val and ((epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epoch_size):
            m = evaluate(self.eval_net, self._dataset(False), self.ranks,
                         num_samples=self._dataset(False).num_samples)
            top1 = m["top1"]
            row.update(val_top1=m["top1"], val_top5=m["top5"], val_loss=m["loss"])
            self.log.info(f"epoch {epoch + 1}: val top-1 {100 * m['top1']:.2f}% top-5 {100 * m['top5']:.2f}% "
                          f"loss {m['loss']:.4f} ({m['num_images']} images)")
        for line in self.data.bad_images.epoch_lines(epoch + 1, cfg.bad_image_mode):
            self.log.warning(line)
        improved = top1 is not None and top1 > self.best_top1
        if improved:
            self.best_top1 = top1
        self._on_main("writing checkpoints and metrics", lambda: self._save_epoch(epoch, top1, improved, row))

    def _save_epoch(self, epoch, top1, improved, row):
        if self._finite_weights():
            meta = self._meta(epoch, self.steps_per_epoch, top1)
            if improved or not self.data.has_val:  # no val set: best = last
                self.ckpt.save_best(self.net, meta)
            self.ckpt.save_latest(self.train_step.training_state(), meta)
            if self.cfg.save_every_epochs > 0 and (epoch + 1) % self.cfg.save_every_epochs == 0:
                self.ckpt.save_epoch(self.net, epoch + 1, meta)
        self.metrics.add(row)
