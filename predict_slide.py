"""Tumour maps of whole-slide images with a trained model, one tracked run per slide:

    python predict_slide.py model=<run id | models:/NAME@alias | path.keras> slide=PATH [tta=flips] [output=DIR]
    python predict_slide.py model=<ref> slides=DIR          (or a quoted glob: slides='/data/*.svs')
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

if __name__ == "__main__":
    from histo_transfer.tasks.cli import run

    run("histo_transfer.tasks.predict_slide", ROOT / "conf")
