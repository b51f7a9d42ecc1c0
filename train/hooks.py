"""What the student trainer's loop does around its steps, as hooks (detectron2's ``HookBase``).

``StudentTrainer.train`` calls, for every hook in its list order:

    before_train()   once, before the session's first step
    after_step()     after every step (the trainer's ``iteration``, ``epoch``, ``step``,
                     ``last_values``, ``step_seconds`` and ``data_seconds`` describe it)
    after_epoch()    after every complete epoch (``epoch`` is already the next one)
    after_train()    once, also when the session ends with an error: ``trainer.finished`` (the
                     run reached its last iteration) or ``trainer.stopped`` (``stop_after``
                     ended this session, to be resumed) says which ending it was; neither is
                     set after an error

The order of the list is the order of the effects: the log row and the progress bar of a step come
before its checkpoint, an epoch's evaluation before the checkpoint that records it in ``history``,
and the bar closes before the final evaluation prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from train.trainer import StudentTrainer


class HookBase:
    """A step of the loop's bookkeeping; ``trainer`` is set by the trainer that runs it."""

    trainer: StudentTrainer

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class ProgressBar(HookBase):
    """A tqdm bar over the run's iterations (rank 0, when ``progress`` is on), with epoch, loss and lr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def before_train(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.total_iters, initial=t.iteration, desc=f"train {t.config.student} [{t.config.method}]",
                        disable=not self.enabled, dynamic_ncols=True)

    def after_step(self) -> None:
        values = self.trainer.last_values
        self.bar.update(1)
        self.bar.set_postfix(epoch=self.trainer.epoch, loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2g}")

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LogRows(HookBase):
    """A ``log.csv`` row (and TensorBoard scalars) every ``every`` iterations, at the run's first and at its last."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self) -> None:
        t = self.trainer
        if t.run_log is not None and (t.iteration % self.every == 0 or t.iteration in (1, t.total_iters)):
            t.run_log.log(t.iteration, t.epoch, t.step, t.last_values, t.step_seconds, t.data_seconds)


class Evaluation(HookBase):
    """COCO AP on the validation split every ``every`` epochs (0: none during the run) and once at the
    end of a finished run (``trainer.final_metrics``, results.json's "final"); an epoch that ends the
    run leaves its evaluation to the final one."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_epoch(self) -> None:
        t = self.trainer
        if self.every and t.epoch % self.every == 0 and t.iteration < t.total_iters:
            t.evaluate()

    def after_train(self) -> None:
        if self.trainer.finished:
            self.trainer.final_metrics = self.trainer.evaluate()


class PeriodicCheckpoint(HookBase):
    """The run state in ``path`` (``out/last.pt``), where a resumed run continues: every ``every``
    iterations (0: never), after every epoch but the last, and where a session stopped by ``stop_after``
    ends. The trainer saves the finished run itself."""

    def __init__(self, path: Path, every: int) -> None:
        self.path = path
        self.every = every
        self.saved_at: int | None = None

    def before_train(self) -> None:
        self.saved_at = self.trainer.iteration  # a resumed session starts from this very checkpoint

    def after_step(self) -> None:
        if self.every and self.trainer.iteration % self.every == 0:
            self._save()

    def after_epoch(self) -> None:
        if self.trainer.iteration < self.trainer.total_iters:
            self._save()

    def after_train(self) -> None:
        if self.trainer.stopped:
            self._save()

    def _save(self) -> None:
        if self.saved_at != self.trainer.iteration:
            self.trainer.save(self.path)
            self.saved_at = self.trainer.iteration
