"""Score the test patches with a trained model and write a checked submission.csv:

    python predict.py model=<run id | models:/NAME@alias | path.keras> data=kaggle data.root=PATH tta=dihedral8
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.predict", ROOT / "conf")
