"""A config's identity: the same resolved config, the same key.

Checkpoints are kept under it (so `trainer.resume=true` finds an interrupted run's state), a CV's
parent record is kept under it, and every training run is tagged with it (a resumed sweep keeps the
jobs whose config already finished). A pure function of the config: no Keras, no MLflow.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf


def run_key(cfg: DictConfig) -> str:
    """16 hex digits of the resolved config, `trainer.resume` left out."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["trainer"].pop("resume", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
