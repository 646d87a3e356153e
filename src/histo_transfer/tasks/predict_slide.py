"""predict_slide.py: tumour maps of whole-slide images with any model reference, one tracked run per slide."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.config.errors import ConfigError
from histo_transfer.config.options import one_of
from histo_transfer.evaluation.inference import TTA
from histo_transfer.tasks import validation
from histo_transfer.tasks.validation import EnsembleKeys, SlideKeys

CONFIG_NAME = "predict_slide"
LOADS_TENSORFLOW = True  # tasks.cli imports TensorFlow before main, dropping its load-time banners
PATH_KEYS = ("slide.path",)  # `slide=PATH` on the command line names the slide (tasks.cli.path_overrides)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")
"""The files of a `slides=DIR` folder that are scored: OpenSlide's formats whose slide is one file
(MIRAX's .mrxs names its data folder beside it). A glob takes whatever files it matches."""


@dataclass
class PredictSlideKeys:
    model: Any  # any model reference, as predict.py's
    slides: Optional[str]
    tta: str = one_of(TTA)
    output: Optional[str]
    ensemble: EnsembleKeys
    slide: SlideKeys


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, keys=PredictSlideKeys)
    if cfg.slide.stride % 2:  # the 96-px window is centred on the stride's cell
        raise ConfigError("slide.stride", f"{cfg.slide.stride} must be even, to centre a window on each cell")
    slide_paths(cfg)


def slide_paths(cfg: DictConfig) -> list[Path]:
    """The slides the command line names: `slide=PATH`, or every slide file of `slides=DIR` (by suffix),
    or every file `slides=GLOB` matches; sorted."""
    one, many = cfg.slide.path, cfg.slides
    if (one is None) == (many is None):
        raise ConfigError("slide.path", "give one slide (slide=PATH) or many (slides=DIR or slides='GLOB')"
                          + ("" if one is None else ", not both"))
    if one is not None:
        if not Path(one).expanduser().is_file():
            raise ConfigError("slide.path", f"{one}: no such slide file")
        return [Path(one).expanduser()]
    folder = Path(many).expanduser()
    if folder.is_dir():
        paths = [path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES]
        if not paths:
            raise ConfigError("slides", f"{many}: no slide files ({', '.join(SLIDE_SUFFIXES)}) in this folder")
    else:
        paths = [Path(match) for match in glob.glob(str(folder)) if Path(match).is_file()]
        if not paths:
            raise ConfigError("slides", f"{many}: neither a folder nor a glob that matches any file")
    return sorted(paths)


def main(cfg: DictConfig, context: RunContext | None = None) -> list[Path]:
    validate(cfg)
    from histo_transfer.workflows.slide_scoring import predict_slides  # TensorFlow: once the config is known to be good

    return predict_slides(cfg, slide_paths(cfg), folder=cfg.slides is not None, context=context)
