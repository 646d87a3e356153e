"""Hydra entrypoints that fail on user mistakes with one line and exit status 2, before TensorFlow loads.

Each entrypoint names a task module (tasks/<task>.py): its CONFIG_NAME (the config it composes),
`validate(cfg)` and `main(cfg, context)`. This is the only layer that reads how a task was started
(Hydra's job config, the sweep's environment, the command line); the task gets it as an explicit
RunContext.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from histo_transfer.config.context import RunContext
from histo_transfer.config.errors import Terminated, UserError
from histo_transfer.tasks.console import import_tensorflow_quietly
from histo_transfer.tracking.access import refuse_credentials_in_uri
from histo_transfer.tracking.redaction import redact_log_records

PARENT_RUN_ENV = "HISTO_TRANSFER_PARENT_RUN_ID"  # a sweep's parent run, set by tasks.sweep for its jobs


def run(task: str, config_dir: Path) -> None:
    """Run the task module `task` (e.g. "histo_transfer.tasks.train") under Hydra, after checking every
    config the command line asks for."""
    module = importlib.import_module(task)
    redact_log_records()
    sys.argv[1:] = path_overrides(sys.argv[1:], config_dir, getattr(module, "PATH_KEYS", ()))  # Hydra reads argv
    args, _ = _arguments().parse_known_args()
    config_name = args.config_name or module.CONFIG_NAME
    if args.help:  # Hydra's own help says "cli is powered by Hydra" and lists internal options
        from histo_transfer.tasks.help import help_text

        print(help_text(Path(sys.argv[0]).name, module.__doc__ or "", config_dir, config_name, args.overrides))
        return
    if not (args.help or args.hydra_help or args.version or args.info or args.cfg or args.shell_completion):
        exit_on_user_error(lambda: precheck(config_dir, config_name, args.overrides, module.validate))

    @hydra.main(config_path=str(config_dir), config_name=module.CONFIG_NAME, version_base="1.3")
    def main(cfg: DictConfig):
        redact_log_records()  # again: a launcher's job may run in a process of its own
        if getattr(module, "LOADS_TENSORFLOW", False):  # here, so its load-time banners can be dropped
            import_tensorflow_quietly()
        return exit_on_user_error(lambda: module.main(cfg, job_context()))

    # SIGTERM's default ends the process where it stands, a run left RUNNING; as an exception, runs end KILLED
    installed = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, Terminated.raise_on_sigterm) if installed else None
    try:
        main()
    except Terminated:  # between a sweep's jobs, in Hydra's callbacks or while TensorFlow loads
        print("terminated: stopped by SIGTERM", file=sys.stderr)
        sys.exit(Terminated.exit_code)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def job_context() -> RunContext:
    """This Hydra job's overrides, its sweep's parent run (in a multirun) and the command line."""
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    return RunContext(overrides=tuple(hydra_cfg.overrides.task),
                      parent_run_id=os.environ.get(PARENT_RUN_ENV) if in_sweep else None,
                      command=tuple(sys.argv))


def path_overrides(arguments: list[str], config_dir: Path, path_keys: tuple[str, ...]) -> list[str]:
    """`GROUP=VALUE` as `GROUP.path=VALUE` for each `GROUP.path` in `path_keys`, unless every
    comma-separated VALUE is an option of conf/GROUP/: `slide=scan.svs` names a file, as users write
    it, while `slide=default` still picks the group's option. Other arguments are kept as they are."""
    groups = {key.removesuffix(".path"): key for key in path_keys}
    rewritten = []
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals and key in groups and not all((config_dir / key / f"{option}.yaml").is_file()
                                                 for option in value.split(",")):
            argument = f"{groups[key]}={value}"
        rewritten.append(argument)
    return rewritten


def _arguments() -> argparse.ArgumentParser:
    """Hydra's command-line flags, enough to tell overrides from flags and to skip the precheck for help."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("overrides", nargs="*")
    for flags in (["--help", "-h"], ["--hydra-help"], ["--version"], ["--resolve"], ["--run", "-r"],
                  ["--multirun", "-m"], ["--shell-completion", "-sc"]):
        parser.add_argument(*flags, action="store_true")
    for flags in (["--cfg", "-c"], ["--package", "-p"], ["--config-path", "-cp"], ["--config-name", "-cn"],
                  ["--config-dir", "-cd"], ["--experimental-rerun"]):
        parser.add_argument(*flags)
    parser.add_argument("--info", "-i", nargs="?", const="all")
    return parser


def precheck(config_dir: Path, config_name: str, overrides: list[str], validate: Callable[[DictConfig], None]) -> None:
    """Compose and validate the config of each value a sweep lists, so a typo fails before any job starts."""
    for variant in _variants(overrides):
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                cfg = compose(config_name, overrides=variant)
        except MissingConfigException as exc:
            raise UserError(_missing_option(exc)) from exc
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(_one_line(exc)) from exc
        validate(cfg)
        uri = OmegaConf.select(cfg, "tracking.uri", default=None)
        if uri:  # before Hydra writes the command line into .hydra/
            refuse_credentials_in_uri(str(uri))


def _variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each choice sweep (not their product); other sweeps are left to the sweeper."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UserError(_one_line(exc)) from exc
    fixed, sweeps = [], []
    for override in parsed:
        if override.get_key_element().startswith("hydra"):
            continue
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_choice_sweep():
            key = override.get_key_element()
            sweeps.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    first = [values[0] for values in sweeps]
    variants = [fixed + first]
    for position, values in enumerate(sweeps):
        for value in values[1:]:
            variants.append(fixed + first[:position] + [value] + first[position + 1:])
    return variants


def exit_on_user_error(action):
    """Run `action`; a UserError (or SIGTERM outside training) becomes its one line and exit code."""
    try:
        return action()
    except UserError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Terminated:  # outside a training run's epochs (those turn it into TrainingInterrupted)
        print("terminated: stopped by SIGTERM", file=sys.stderr)
        sys.exit(Terminated.exit_code)


def _missing_option(exc: MissingConfigException) -> str:
    missing = str(exc.missing_cfg_file or "")
    group, _, option = missing.rpartition("/")
    if group and exc.options is not None:
        return f"{group}={option}: no such option; choose one of {', '.join(sorted(exc.options))}"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    parts = [str(exc).strip().splitlines()[0]]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        parts.append(str(exc.__cause__).strip().splitlines()[0])
    return " - ".join(parts)
