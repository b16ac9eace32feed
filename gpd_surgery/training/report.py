"""Progress of a run on the main process: ``Reporter`` (says nothing; subclass it) and the console display."""
from __future__ import annotations

from typing import Any


class Reporter:
    """Receives progress on the main process. Subclass it for a display; the default says nothing."""

    def start(self, info: dict[str, Any]) -> None:
        """Before the first epoch: mode, device, world size, sample and step counts, parameters."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` begins; it has ``steps`` steps."""

    def step(self, step: int, metrics: dict[str, float], done: int) -> None:
        """``done`` steps of this epoch are done; ``metrics`` are running means over them (this process)."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        """The epoch's record: train metrics (all processes), validation metrics, learning rate, time."""

    def finish(self, result: dict[str, Any]) -> None:
        """The run's result, as ``Trainer.run`` returns it."""

    def note(self, message: str) -> None:
        """Something the user should know that does not stop the run (a missing optional package)."""


def _pair(m: dict[str, float], who: str) -> str:
    return f"{m[who + '_loss']:.3f} / {100 * m[who + '_acc']:.1f}%"


def format_metrics(m: dict[str, float]) -> str:
    """``teacher CE / ACC  student CE / ACC`` (the teacher only when there is one)."""
    parts = [f"teacher {_pair(m, 'teacher')}"] if "teacher_loss" in m else []
    return "  ".join(parts + [f"student {_pair(m, 'student')}"])


class ConsoleReporter(Reporter):
    """A rich progress bar with live loss and accuracy of teacher and student, and one line per epoch."""

    def __init__(self, console: Any, intro: list[str] | None = None) -> None:
        self.console = console
        self.intro = intro or []  # lines printed when training starts, after the checks
        self.progress: Any = None
        self.task: Any = None

    def start(self, info: dict[str, Any]) -> None:
        if info["mode"] == "gpd":
            times = info["params"] / max(1, info["student_params"])
            what = (f"GPD: dynamic teacher ({info['params']:,} parameters, {times:.1f}x the student; "
                    f"{info['checkpoint_bytes'] / 2**20:,.1f} MiB per checkpoint) and student "
                    f"({info['student_params']:,}, shared)")
        else:
            what = f"the student alone ({info['params']:,} parameters)"
        for line in self.intro:
            self.console.print(line, highlight=False, soft_wrap=True)
        procs = f" x {info['world_size']} processes" if info["world_size"] > 1 else ""
        self.console.print(f"training {what} on {info['device']}{procs}; {info['train_samples']:,} training and "
                           f"{info['val_samples']:,} validation samples, {info['steps_per_epoch']} steps per epoch",
                           highlight=False, soft_wrap=True)
        if info["start_epoch"]:
            self.console.print(f"resuming after epoch {info['start_epoch']}", highlight=False)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.close()
        if not self.console.is_terminal:
            return
        self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"), console=self.console,
                                 transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, metrics="")

    def step(self, step: int, metrics: dict[str, float], done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, metrics=f"lr {metrics['lr']:.3g}  {format_metrics(metrics)}")

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.close()
        line = f"epoch {record['epoch']:>3}  train  {format_metrics(record['train'])}"
        if "val" in record:
            line += f"  |  val  {format_metrics(record['val'])}"
        self.console.print(line + f"  ({record['train_seconds']:.1f} s)", highlight=False, soft_wrap=True)

    def finish(self, result: dict[str, Any]) -> None:
        self.close()

    def note(self, message: str) -> None:
        self.close()
        self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
