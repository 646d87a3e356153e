"""How a task was started, beside its config: built by the CLI layer and passed in explicitly."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunContext:
    overrides: tuple[str, ...] = ()  # the command line's overrides: they name the run
    parent_run_id: str | None = None  # the sweep's parent run, for a job of a multirun
    command: tuple[str, ...] = ()  # the command line as typed (script first), for the resume hint

    def resume_command(self) -> str:
        """The same command with trainer.resume=true."""
        words = [Path(self.command[0]).name, *self.command[1:]] if self.command else ["train.py", *self.overrides]
        words = [w for w in words if w != "trainer.resume=true"]
        return "python " + " ".join(shlex.quote(w) for w in [*words, "trainer.resume=true"])
