"""What a run optimises: one validation metric and its direction (config key `objective`).

Best epochs, early stopping, plateau schedules, keras-tuner, sweep summaries and the value
train.py returns to Hydra sweepers all read it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from histo_transfer.config.options import one_of

EPOCH_METRICS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


@dataclass
class ObjectiveKeys:
    metric: str = one_of(tuple(m for m in EPOCH_METRICS if m.startswith("val_")))
    mode: str = one_of(("max", "min"))


@dataclass(frozen=True)
class Objective:
    metric: str = "val_auc"
    mode: str = "max"

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls(str(cfg.metric), str(cfg.mode))

    @property
    def worst(self) -> float:
        return -math.inf if self.mode == "max" else math.inf

    @property
    def best_metric(self) -> str:
        """The run-level metric that holds the objective's value at the best epoch."""
        return f"best_{self.metric}"

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than
