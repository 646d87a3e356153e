"""Register a model in the MLflow model registry, with an alias: a training run's, or an ensemble
exported (TTA baked in) as one self-contained model:

    python scripts/register.py run=<run id> name=pcam-classifier alias=champion
    python scripts/register.py model=<cv or sweep parent run id> export.tta=dihedral8 name=pcam-ensemble
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.register", ROOT / "conf")
