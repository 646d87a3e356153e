"""Train one model, or a sweep of them: `python train.py backbone=resnet152v2 data.frac=0.3`.

Config groups live in conf/; README lists them. Runs are recorded in MLflow (mlruns/ by default).
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.train", ROOT / "conf")
