"""Where a model looks: Grad-CAM heat maps over chosen patches, written to a PNG and logged to MLflow:

    python scripts/explain.py model=<run id> data=kaggle data.root=PATH ids=[id1,id2,id3]
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.explain", ROOT / "conf")
