"""keras-tuner's tuners by name (config group `tuner`), with their keys and the search space they may vary.

Config validation reads this registry, so keras-tuner itself is imported only when a tuner is built;
tuning.py runs the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from histo_transfer.config.options import Options, Range, between, check_range


@dataclass
class Bounds:
    min: float
    max: float


@dataclass
class SearchSpace:
    """What a search may vary; null leaves a key at its config value."""

    lr: Optional[Bounds]  # log-uniform
    dropout: Optional[Bounds]


@dataclass
class TunerKeys:
    name: str
    max_trials: int = between(1)
    epochs: int = between(1)
    executions_per_trial: int = between(1)
    seed: int
    directory: str
    project_name: str
    search_space: SearchSpace


@dataclass
class HyperbandKeys(TunerKeys):
    max_epochs: int = between(1)
    factor: int = between(2)
    hyperband_iterations: int = between(1)


@dataclass
class BayesianKeys(TunerKeys):
    num_initial_points: int = between(1)


def _check_search_space(node, tuner_class) -> None:
    """Bounds inside their key's range (lr > 0, dropout < 1), min below max."""
    for key, high in (("lr", None), ("dropout", 1)):
        bounds = node.search_space[key]
        if bounds is not None:
            where = f"tuner.search_space.{key}"
            check_range(bounds.min, f"{where}.min", Range(0, low_open=key == "lr"))
            check_range(bounds.max, f"{where}.max", Range(bounds.min, high, low_open=True, high_open=True))


TUNERS = Options("tuner", check=_check_search_space)


@TUNERS.register("random", TunerKeys)
def random_search(cfg):
    import keras_tuner as kt

    return kt.RandomSearch, {"max_trials": cfg.max_trials, "executions_per_trial": cfg.executions_per_trial}


@TUNERS.register("hyperband", HyperbandKeys)
def hyperband(cfg):
    import keras_tuner as kt

    return kt.Hyperband, {"max_epochs": cfg.max_epochs, "factor": cfg.factor,
                          "hyperband_iterations": cfg.hyperband_iterations}


@TUNERS.register("bayesian", BayesianKeys)
def bayesian(cfg):
    import keras_tuner as kt

    return kt.BayesianOptimization, {"max_trials": cfg.max_trials, "executions_per_trial": cfg.executions_per_trial,
                                     "num_initial_points": cfg.num_initial_points}
