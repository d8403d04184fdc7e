"""Test hooks for train.py, kept out of the project's code: run ``python tests/hooks.py ARGS`` (alone or
under mpirun/msrun) instead of ``python train.py ARGS``; each hook is switched on by its environment
variable and patches the project from outside before train.main runs.

- ISQRT_COV_INJECT_NAN_STEP="G" or "G@R": the training images of global step G are multiplied by NaN
  (on rank R only), as a corrupt batch or a float16 overflow would make them. With gradient
  accumulation G counts micro-batches (update G // grad_accumulation_steps).
- ISQRT_COV_DUMP_WEIGHTS=DIR: every rank saves its initial and final parameters as
  DIR/rank_<r>_initial.npz and DIR/rank_<r>.npz.
- ISQRT_COV_RANK0_DELAY=S: rank 0 sleeps S seconds after its first epoch-end checkpoint, as a slow
  write of a big one would.
- ISQRT_COV_CHECKPOINT_DELAY=S: every checkpoint write waits S seconds between writing the temporary
  file and renaming it, so a test can kill the process at that moment.
- ISQRT_COV_LOG_DELAY=S: the loop sleeps S seconds after each step line it logs, so that a signal a
  test sends on reading that line arrives before the epoch's last step, however busy the machine.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECT_NAN_ENV = "ISQRT_COV_INJECT_NAN_STEP"
DUMP_WEIGHTS_ENV = "ISQRT_COV_DUMP_WEIGHTS"
RANK0_DELAY_ENV = "ISQRT_COV_RANK0_DELAY"
CHECKPOINT_DELAY_ENV = "ISQRT_COV_CHECKPOINT_DELAY"
LOG_DELAY_ENV = "ISQRT_COV_LOG_DELAY"


class _NaNDataset:
    """The training pipeline (src.data.FolderPipeline), its batch number ``target`` of the run multiplied by NaN."""

    def __init__(self, pipeline, trainer, target):
        self.pipeline, self.trainer, self.target = pipeline, trainer, target

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def epoch(self, epoch, first_batch=0, **kwargs):
        first = epoch * self.trainer.steps_per_epoch * self.trainer.accumulation + first_batch
        for i, (images, labels) in enumerate(self.pipeline.epoch(epoch, first_batch, **kwargs)):
            yield (images * float("nan") if first + i == self.target else images), labels


def _nan_target(rank):
    step, _, only = os.environ.get(INJECT_NAN_ENV, "").partition("@")
    return int(step) if step and (not only or int(only) == rank) else -1


def install():
    """Patch src.engine.Trainer and src.checkpoint for the hooks whose variables are set."""
    import numpy as np
    from src import checkpoint, engine

    trainer = engine.Trainer
    if os.environ.get(INJECT_NAN_ENV):
        dataset = trainer._dataset

        def _dataset(self, training):
            ds = dataset(self, training)
            target = _nan_target(self.dist.rank)
            return _NaNDataset(ds, self, target) if training and target >= 0 else ds
        trainer._dataset = _dataset

    if os.environ.get(DUMP_WEIGHTS_ENV):
        fit, build = trainer.fit, trainer._build

        def _dump(self, name):
            folder = os.environ[DUMP_WEIGHTS_ENV]
            os.makedirs(folder, exist_ok=True)
            np.savez(os.path.join(folder, name), **{p.name: p.asnumpy() for p in self.net.get_parameters()})

        def _build(self):
            build(self)
            _dump(self, f"rank_{self.dist.rank}_initial.npz")
        trainer._build = _build

        def _fit(self):
            code = fit(self)
            _dump(self, f"rank_{self.dist.rank}.npz")
            return code
        trainer.fit = _fit

    if os.environ.get(RANK0_DELAY_ENV):
        save_epoch = trainer._save_epoch

        def _save_epoch(self, *args):
            save_epoch(self, *args)
            delay = os.environ.pop(RANK0_DELAY_ENV, None)  # once: after the first epoch-end checkpoint
            if delay:
                time.sleep(float(delay))
        trainer._save_epoch = _save_epoch

    if os.environ.get(LOG_DELAY_ENV):
        log_step = trainer._log_step

        def _log_step(self, *args):
            log_step(self, *args)
            time.sleep(float(os.environ[LOG_DELAY_ENV]))
        trainer._log_step = _log_step

    if os.environ.get(CHECKPOINT_DELAY_ENV):
        atomic_write = checkpoint.atomic_write

        def _atomic_write(path, write, **kwargs):
            def slow(tmp):
                write(tmp)
                time.sleep(float(os.environ[CHECKPOINT_DELAY_ENV]))
            return atomic_write(path, slow, **kwargs)
        checkpoint.atomic_write = _atomic_write


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.argv[0] = os.path.join(ROOT, "train.py")
    import train  # noqa: E402
    from src.cli import run_cli  # noqa: E402

    install()
    run_cli(lambda: train.main(sys.argv[1:]))
