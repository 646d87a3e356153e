"""tf.distribute strategies: one device, several GPUs of one host, or several hosts.

trainer.batch_size is the GLOBAL batch: each of N replicas computes batch_size / N patches per
step. The learning rate is not rescaled for you; with N times the batch, the linear scaling rule
(optimizer.lr times N, with a warm start) is the usual starting point.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from histo_transfer.config import STRATEGIES
from histo_transfer.errors import ConfigError

log = logging.getLogger(__name__)


def split_cpu(devices: int) -> None:
    """Present the CPU as `devices` logical devices, to try mirrored training without GPUs."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as exc:
        if len(tf.config.list_logical_devices("CPU")) != devices:
            raise ConfigError("trainer.logical_cpu_devices",
                              "TensorFlow already started in this process; set it in a fresh process") from exc


def make_strategy(trainer_cfg) -> tf.distribute.Strategy:
    """The strategy named by trainer.strategy; `auto` mirrors over several local GPUs, else one device."""
    if trainer_cfg.logical_cpu_devices:
        split_cpu(trainer_cfg.logical_cpu_devices)
    name = trainer_cfg.strategy
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        devices = gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "multi_worker":  # hosts and this worker's rank come from the TF_CONFIG variable
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ConfigError("trainer.strategy", f"{name!r} is not one of {', '.join(STRATEGIES)}")
    log.info("distribution: %s over %d replica(s)", name, strategy.num_replicas_in_sync)
    return strategy
