"""tf.distribute strategies (key `trainer.strategy`): one device, several GPUs of one host, or several hosts.

trainer.batch_size is the GLOBAL batch: each of N replicas computes batch_size / N patches per
step. The learning rate is not rescaled for you; with N times the batch, the linear scaling rule
(optimizer.lr times N, with a warm start) is the usual starting point.

Several hosts (multi_worker): every worker runs the same command with its own TF_CONFIG; all of them
train, validate and predict together (collective ops), but only the chief records anything: the
others write to a scratch store that is deleted at their end (training_run.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from histo_transfer.config.errors import ConfigError
from histo_transfer.config.options import Options

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

    if not os.environ.get("TF_CONFIG"):
        raise ConfigError("trainer.strategy", "multi_worker needs TF_CONFIG (the cluster and this worker's "
                          "place in it) in the environment of every worker; README: Past one machine")
    _repair_keras_fit_for_multi_worker()
    return tf.distribute.MultiWorkerMirroredStrategy()


@dataclass(frozen=True)
class WorkerRole:
    index: int
    workers: int
    is_chief: bool


def worker_role() -> WorkerRole:
    """This process's place in a multi-worker cluster, from TF_CONFIG (the chief: task `chief`, or
    worker 0 of a cluster without one); one chief worker when TF_CONFIG is not set."""
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
        kind, index = task.get("type", "worker"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError("trainer.strategy", f"TF_CONFIG is not valid cluster JSON ({exc})") from None
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", [])) or 1
    is_chief = kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))
    return WorkerRole(index, workers, is_chief)


def _repair_keras_fit_for_multi_worker() -> None:
    """Keras 3 (3.12 to 3.15 at least) cannot fit() under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): it averages a first batch of per-replica inputs across workers only to
    learn their shapes, and averages the already synchronised scalar metrics over an axis 0 they do not
    have. Both fail; these replacements take one replica's batch and average without an axis. Only this
    strategy reaches them; tests/test_scaleout.py trains two real workers through them."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_histo_transfer_repaired", False):
        return
    reduce_per_replica = trainer.reduce_per_replica

    def reduce_for_workers(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None) if trainer._is_per_replica_instance(v) else v, values)
        return reduce_per_replica(values, strategy, reduction)

    def symbolic_build_from_one_replica(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(batches))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_for_workers
    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build_from_one_replica
    trainer._histo_transfer_repaired = True


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
