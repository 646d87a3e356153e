"""Score any labelled folder with a trained model; the report (ROC, PR, CI, calibration, errors) goes to MLflow:

    python evaluate.py model=<run id | models:/NAME@alias | path.keras> data=kaggle data.root=PATH
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.evaluate", ROOT / "conf")
