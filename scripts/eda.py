"""Exploratory data analysis logged to MLflow as its own run.

    python scripts/eda.py data=kaggle data.root=PATH
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.eda", ROOT / "conf")
