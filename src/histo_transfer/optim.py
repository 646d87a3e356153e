"""Optimizer and learning-rate schedule from the `optimizer` config group."""

from __future__ import annotations

import keras


def build_optimizer(cfg, steps_per_epoch: int, epochs: int) -> tuple[keras.optimizers.Optimizer, list]:
    """The optimizer, plus the callbacks its schedule needs (ReduceLROnPlateau for `plateau`)."""
    lr = cfg.lr
    callbacks = schedule_callbacks(cfg)
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=max(1, steps_per_epoch * epochs))
    if cfg.name == "adam":
        return keras.optimizers.Adam(lr), callbacks
    if cfg.name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay), callbacks
    if cfg.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum), callbacks
    raise ValueError(f"unknown optimizer {cfg.name}")


def schedule_callbacks(cfg) -> list:
    """Callbacks a schedule needs beside the optimizer (also for a resumed run, whose optimizer is restored)."""
    if cfg.schedule == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5, patience=1)]
    return []
