"""Optimizers and learning-rate schedules (config group `optimizer`, key `optimizer.schedule`)."""

from __future__ import annotations

from dataclasses import dataclass

from histo_transfer.config.options import Options, between, one_of

OPTIMIZERS = Options("optimizer")
SCHEDULES = Options("optimizer.schedule")


@dataclass
class OptimizerKeys:
    name: str
    lr: float = between(0, low_open=True)
    schedule: str = one_of(SCHEDULES)
    ema: bool  # keep an exponential moving average of the weights: validated, checkpointed, saved
    ema_momentum: float = between(0, 1, high_open=True)


@dataclass
class AdamWKeys(OptimizerKeys):
    weight_decay: float = between(0)


@dataclass
class SGDKeys(OptimizerKeys):
    momentum: float = between(0, 1, high_open=True)


def _ema(cfg) -> dict:
    """Keras optimizers' own weight averaging (`use_ema`); training.session.EMAWeightsInModel puts the
    average in the model wherever the model is validated, checkpointed or saved."""
    return {"use_ema": cfg.ema, "ema_momentum": cfg.ema_momentum}


@OPTIMIZERS.register("adam", OptimizerKeys)
def adam(cfg, learning_rate):
    import keras

    return keras.optimizers.Adam(learning_rate, **_ema(cfg))


@OPTIMIZERS.register("adamw", AdamWKeys)
def adamw(cfg, learning_rate):
    import keras

    return keras.optimizers.AdamW(learning_rate, weight_decay=cfg.weight_decay, **_ema(cfg))


@OPTIMIZERS.register("sgd", SGDKeys)
def sgd(cfg, learning_rate):
    import keras

    return keras.optimizers.SGD(learning_rate, momentum=cfg.momentum, **_ema(cfg))


@dataclass
class Schedule:
    learning_rate: object  # a float or a keras LearningRateSchedule
    callbacks: list  # what the schedule needs beside the optimizer (also after a resume)


@SCHEDULES.register("constant")
def constant(cfg, total_steps: int, objective) -> Schedule:
    return Schedule(cfg.lr, [])


@SCHEDULES.register("cosine")
def cosine(cfg, total_steps: int, objective) -> Schedule:
    import keras

    return Schedule(keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=max(1, total_steps)), [])


@SCHEDULES.register("plateau")
def plateau(cfg, total_steps: int, objective) -> Schedule:
    """Halve the learning rate when the objective stalls for an epoch."""
    import keras

    return Schedule(cfg.lr, [keras.callbacks.ReduceLROnPlateau(monitor=objective.metric, mode=objective.mode,
                                                               factor=0.5, patience=1)])


def build_optimizer(cfg, total_steps: int, objective):
    """The optimizer and its schedule's callbacks."""
    schedule = SCHEDULES[cfg.schedule](cfg, total_steps, objective)
    return OPTIMIZERS[cfg.name](cfg, schedule.learning_rate), schedule.callbacks
