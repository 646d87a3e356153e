"""The shell scripts a user runs find MLflow in whatever environment is in use, not only in a .venv
inside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, loopback_server


def _copy_of_scripts(tmp_path: Path) -> Path:
    """scripts/ in a folder that is not a checkout with a .venv: as for a conda or pipx user."""
    scripts = tmp_path / "elsewhere" / "scripts"
    scripts.mkdir(parents=True)
    for name in ("mlflow_ui.sh", "find_mlflow.sh"):
        shutil.copy2(ROOT / "scripts" / name, scripts / name)
    return scripts


@pytest.mark.scaleout
def test_mlflow_ui_runs_from_an_environment_outside_the_checkout(tmp_path):
    scripts = _copy_of_scripts(tmp_path)
    assert not (scripts.parent / ".venv").exists()
    port = free_port()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # loopback_server puts this interpreter's bin folder first on PATH, as an activated environment does
    with loopback_server([str(scripts / "mlflow_ui.sh"), str(port), uri], f"http://127.0.0.1:{port}/health") as server:
        assert server.poll() is None
    assert (tmp_path / "mlflow.db").is_file()  # it served the store it was given


def test_mlflow_ui_without_any_mlflow_says_how_to_get_one(tmp_path):
    scripts = _copy_of_scripts(tmp_path)
    bare_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                if not (Path(p) / "mlflow").exists() and p != os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")} | {"PATH": bare_path}
    result = subprocess.run([str(scripts / "mlflow_ui.sh"), str(free_port())], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no mlflow found: activate the environment" in result.stderr
