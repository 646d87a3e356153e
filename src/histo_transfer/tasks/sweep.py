"""Hydra callbacks: one MLflow parent run per multirun (any sweeper, any launcher), summarised at the end.

MlflowSweep is registered in conf/config.yaml (hydra.callbacks), SlideSweep in conf/predict_slide.yaml. The parent's id reaches the jobs through the
environment, which launchers hand to the processes they start (joblib, SLURM); the CLI layer reads
it into each job's RunContext. The same sweep command plus `trainer.resume=true` continues the
sweep's last parent (recorded under trainer.checkpoint_dir), and its jobs keep what they finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from histo_transfer.config.objective import Objective
from histo_transfer.tasks.cli import PARENT_RUN_ENV, exit_on_user_error
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.parent_runs import PARENT_RUN_FILE, NewParent, ParentRun
from histo_transfer.tracking.registry import register
from histo_transfer.tracking.schema import GIT_COMMIT_TAG, KIND_TAG, REGISTERED_MODEL_TAG, SLIDE_SOURCE_TAG, RunKind

log = logging.getLogger(__name__)


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.parent = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # raised from a callback, a refusal would be a traceback from Hydra: the CLI's one line instead
        experiment_id = exit_on_user_error(lambda: tracking.setup(config.tracking))
        overrides = list(config.hydra.overrides.task)
        searched = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}

        def new() -> NewParent:
            name = config.tracking.run_name or tracking.run_name_from_overrides(
                overrides + [f"{k}={v}" for k, v in searched.items()], prefix="sweep ")
            return NewParent(experiment_id, name, {
                KIND_TAG: RunKind.SWEEP.value,
                "sweep_overrides": tracking.redact_uri(" ".join(overrides)) or "(none)",
                "sweep_search_space": " ".join(f"{k}={v}" for k, v in searched.items()) or "(grid)",
                "sweep_dir": str(config.hydra.sweep.dir),
                "sweeper": str(config.hydra.sweeper.get("_target_", "")),
                "launcher": str(config.hydra.launcher.get("_target_", "")),
                GIT_COMMIT_TAG: tracking.git_commit(Path(config.paths.root_dir)),
            })

        self.parent = ParentRun.open(_parent_record(config, overrides, searched),
                                     Objective.from_config(config.objective), new, resume=config.trainer.resume)
        os.environ[PARENT_RUN_ENV] = self.parent.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            best_run_id = self.parent.summarise("sweep_summary")
            if best_run_id and config.tracking.get("register_best"):
                name = config.tracking.register_best
                version = register(best_run_id, name, "champion")
                self.parent.client.set_tag(self.parent.run_id, REGISTERED_MODEL_TAG, f"models:/{name}/{version}")
        except Exception:
            self.parent.end("FAILED")
            raise
        self.parent.end("FINISHED")
        os.environ.pop(PARENT_RUN_ENV, None)


class SlideSweep(Callback):
    """`predict_slide.py -m slide=a.svs,b.svs hydra/launcher=slurm|ray|parallel`: one job per slide, each
    slide's run nested under one parent (kind slide-folder), as `slides=DIR` nests them in one process.
    The parent ends FAILED when a slide's did (or the sweep stopped), FINISHED otherwise."""

    def __init__(self) -> None:
        self.parent = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # raised from a callback, a refusal would be a traceback from Hydra: the CLI's one line instead
        experiment_id = exit_on_user_error(lambda: tracking.setup(config.tracking))
        overrides = list(config.hydra.overrides.task)
        shown = tracking.redact_uri(" ".join(overrides)) or "(none)"
        tags = {KIND_TAG: RunKind.SLIDE_FOLDER.value, SLIDE_SOURCE_TAG: shown, "sweep_overrides": shown,
                "launcher": str(config.hydra.launcher.get("_target_", ""))}
        # no objective: slides are not ranked by one; ended below, or FAILED when this process exits first
        self.parent = ParentRun.create(experiment_id, tracking.run_name_from_overrides(overrides, "slides "), tags,
                                       objective=None)
        os.environ[PARENT_RUN_ENV] = self.parent.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:  # on_multirun_start failed, and said so
            return
        slides = self.parent.children()
        failed = [run for run in slides if run.info.status != "FINISHED"]
        self.parent.client.log_metric(self.parent.run_id, "slides_scored", len(slides) - len(failed))
        self.parent.client.log_metric(self.parent.run_id, "slides_failed", len(failed))
        self.parent.end("FAILED" if failed else "FINISHED")
        os.environ.pop(PARENT_RUN_ENV, None)


def _parent_record(config: DictConfig, overrides: list[str], searched: dict[str, str]) -> Path:
    """Where the sweep's parent run id is kept: one file per sweep command (its overrides and search
    space, `trainer.resume` aside), so the same command finds it again."""
    command = {"overrides": [o for o in overrides if not o.startswith("trainer.resume")], "searched": searched,
               "sweeper": str(config.hydra.sweeper.get("_target_", ""))}
    key = hashlib.sha256(json.dumps(command, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config.trainer.checkpoint_dir).expanduser().resolve() / f"sweep-{key}" / PARENT_RUN_FILE
