"""GPD training: the dynamic teacher and the student trained together, with shared parameters.

One module per concern: ``config`` (TrainConfig), ``loss`` (the paper's objective), ``models`` (GPDModel: the
teacher and the student view; PlainModel: the baseline), ``optim`` (optimizer, schedule), ``distributed``
(torchrun, devices, seeds), ``metrics`` (running metrics, validation), ``checkpoints`` (the run's files, resume),
``report`` (progress display), ``loop`` (Trainer, ``train()``), ``data`` (synthetic task, image folders) and
``job`` (what `gpd train` decides from its options; imported by the command only).
"""
from .checkpoints import STATE_FILE, STUDENT_FILE, TEACHER_FILE
from .config import TrainConfig
from .data import image_folder, synthetic
from .loop import Trainer, train
from .loss import GPDLoss, distill_loss
from .metrics import evaluate
from .models import GPDModel, PlainModel, num_outputs
from .optim import lr_at, make_optimizer
from .report import ConsoleReporter, Reporter, format_metrics

__all__ = [
    "ConsoleReporter", "GPDLoss", "GPDModel", "PlainModel", "Reporter", "STATE_FILE", "STUDENT_FILE", "TEACHER_FILE",
    "TrainConfig", "Trainer", "distill_loss", "evaluate", "format_metrics", "image_folder", "lr_at", "make_optimizer",
    "num_outputs", "synthetic", "train",
]
