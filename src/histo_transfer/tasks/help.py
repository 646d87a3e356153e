"""`--help` of every entrypoint: what the program does, the config groups its config composes (the
options a user may choose, none of the internal ones) and the config it would run with."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

HYDRA_LAUNCHER = "hydra/launcher"  # the one Hydra group users choose (conf/hydra/launcher/ + Hydra's basic)


def help_text(program: str, task_doc: str, config_dir: Path, config_name: str, overrides: list[str]) -> str:
    """The help screen of `program` (e.g. train.py); what it does is the first paragraph of its task
    module's docstring (`task_doc`), less the "train.py: " it starts with."""
    what = " ".join(task_doc.strip().split("\n\n")[0].split()).split(": ", 1)[-1]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    groups = sorted(group for group in choices if _user_group(group) and (config_dir / group).is_dir())
    width = max((len(group) for group in groups), default=0)
    lines = [f"{program}: {what}", "",
             f"Usage: python {program} [group=option ...] [key=value ...]   (-m: a sweep over comma-separated values)",
             "", "Config groups (* = this config's choice; `null` = not used unless chosen):"]
    for group in groups:
        options = sorted(path.stem for path in (config_dir / group).glob("*.yaml") if not path.stem.startswith("_"))
        if group == HYDRA_LAUNCHER:
            options = sorted({*options, "basic"})
        chosen = choices[group]
        shown = ", ".join(f"{option}*" if option == chosen else option for option in options)
        lines.append(f"  {group.ljust(width)}  {shown}" + ("" if chosen is not None else "  (null*)"))
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    lines += ["", "Config (override any key, e.g. data.frac=0.3):", "",
              *("  " + line for line in OmegaConf.to_yaml(cfg).rstrip().splitlines()),
              "", "Docs: docs/ (mkdocs serve), docs/configuration.md for every group. Hydra's own flags: --hydra-help"]
    return "\n".join(lines)


def _user_group(group: str) -> bool:
    """A group users choose from: not Hydra's internals (but its launcher), no internal part (`_common`)."""
    if group.startswith("hydra/") and group != HYDRA_LAUNCHER:
        return False
    return not any(part.startswith("_") for part in group.split("/"))
