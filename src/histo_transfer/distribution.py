"""tf.distribute strategies (key `trainer.strategy`): one device, several GPUs of one host, or several hosts.

trainer.batch_size is the GLOBAL batch: each of N replicas computes batch_size / N patches per
step. The learning rate is not rescaled for you; with N times the batch, the linear scaling rule
(optimizer.lr times N, with a warm start) is the usual starting point.
"""

from __future__ import annotations

import logging

from histo_transfer.errors import ConfigError
from histo_transfer.options import Options

log = logging.getLogger(__name__)

STRATEGIES = Options("trainer.strategy")


@STRATEGIES.register("auto")
def auto():
    """Mirrored over the GPUs of this machine when it has more than one, else one device."""
    import tensorflow as tf

    return STRATEGIES["mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "default"]()


@STRATEGIES.register("default")
def default():
    import tensorflow as tf

    return tf.distribute.get_strategy()


@STRATEGIES.register("mirrored")
def mirrored():
    """All local GPUs, or the logical CPU devices of trainer.logical_cpu_devices."""
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    return tf.distribute.MirroredStrategy(devices=devices or [d.name for d in tf.config.list_logical_devices("CPU")])


@STRATEGIES.register("multi_worker")
def multi_worker():
    """Several hosts; each one's place in the cluster comes from its TF_CONFIG variable."""
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def split_cpu(devices: int) -> None:
    """Present the CPU as `devices` logical devices, to try mirrored training without GPUs."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as exc:
        if len(tf.config.list_logical_devices("CPU")) != devices:
            raise ConfigError("trainer.logical_cpu_devices",
                              "TensorFlow already started in this process; set it in a fresh process") from exc


def make_strategy(trainer_cfg):
    """The strategy named by trainer.strategy (call before other TensorFlow work)."""
    if trainer_cfg.logical_cpu_devices:
        split_cpu(trainer_cfg.logical_cpu_devices)
    strategy = STRATEGIES[trainer_cfg.strategy]()
    log.info("distribution: %s over %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy
