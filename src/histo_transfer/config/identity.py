"""A config's identity: the same resolved config, the same key.

Checkpoints are kept under it (so `trainer.resume=true` finds an interrupted run's state), a CV's
parent record is kept under it, and every training run is tagged with it (a resumed sweep keeps the
jobs whose config already finished). A pure function of the config: no Keras, no MLflow.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf


# Keys that say where this machine keeps things, how it shows or records them, not what is trained: left
# out, so that the same run resumed on another machine (other folders, the server under another name,
# other recording settings) keeps its key. data.root stays: it says which data. tracking.experiment is
# where the key is looked up.
MACHINE_KEYS = ("paths", "data.cache_dir", "trainer.checkpoint_dir", "trainer.resume", "trainer.progress",
                "tracking.uri", "tracking.run_name", "tracking.tags", "tracking.register_best",
                "tracking.system_metrics", "tracking.system_metrics_interval", "tracking.outage_limit_s",
                "tracking.upload_checkpoints")


def run_key(cfg: DictConfig) -> str:
    """16 hex digits of the resolved config, MACHINE_KEYS left out."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for dotted in MACHINE_KEYS:
        *parents, name = dotted.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(name, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
