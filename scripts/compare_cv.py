"""Compare recipes out of sample: cross-validation runs side by side on their out-of-fold predictions,
each against the first with a paired bootstrap on the same patches (prints a markdown table):

    python scripts/compare_cv.py 'runs=[<baseline CV run id>,<CV run id>]'
    python scripts/compare_cv.py runs=<parent run id of a sweep with cv=kfold>
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.compare", ROOT / "conf")
