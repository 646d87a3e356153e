"""Composition of every config group option, and config mistakes caught before TensorFlow."""

from __future__ import annotations

import re

import pytest
from conftest import CONF_DIR, compose_config, run_cli, write_kaggle_layout
from omegaconf import OmegaConf

from histo_transfer.config.errors import ConfigError, UserError
from histo_transfer.tasks.cli import precheck
from histo_transfer.tasks.train import validate as validate_training

GROUPS = ["data", "backbone", "augmentation", "optimizer", "trainer", "tracking", "paths", "experiment",
          "hparams_search", "tuner", "debug", "cv"]


@pytest.fixture
def kaggle_root(tmp_path):
    write_kaggle_layout(tmp_path / "kaggle", [0, 1] * 5)
    return tmp_path / "kaggle"


def _options():
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("[!_]*.yaml")):  # _common.yaml is a shared part
            yield group, path.stem


@pytest.fixture
def pcam_root(tmp_path):
    for split in ("train", "valid"):
        for kind in "xy":
            (tmp_path / f"camelyonpatch_level_2_split_{split}_{kind}.h5").touch()
    return tmp_path


@pytest.fixture
def data_roots(kaggle_root, pcam_root, tmp_path):
    """A small folder of each data source's layout, by source name."""
    for split in ("train", "valid"):
        for name in ("0", "1"):
            (tmp_path / "folders" / split / name).mkdir(parents=True)
    return {"kaggle": kaggle_root, "pcam_h5": pcam_root, "folders": tmp_path / "folders"}


# what a recipe cannot run without, beyond data.root and backbone.weights
RECIPE_NEEDS = {"experiment=cpu_pcam_distilled": ["distill.teacher=0123456789abcdef0123456789abcdef"]}


def with_data_root(overrides: list[str], roots: dict) -> list[str]:
    """`overrides` plus the data.root its data source needs (experiments bring their own source), and
    any key the recipe requires."""
    overrides = [*overrides, *(need for key in overrides for need in RECIPE_NEEDS.get(key, []))]
    source = compose_config(overrides).data.name
    return [*overrides, f"data.root={roots[source]}"] if source in roots else overrides


def test_a_recipe_names_the_key_it_cannot_run_without(data_roots):
    """The distilled recipe without its teacher would train a plain cpu_pcam model under its name."""
    cfg = compose_config(["experiment=cpu_pcam_distilled", f"data.root={data_roots['folders']}"])
    with pytest.raises(ConfigError, match=r"^distill.teacher: is required \(the teacher, e.g. the parent run of "
                                          r"experiment=cpu_pcam_cv\): add distill.teacher=VALUE"):
        validate_training(cfg)
    cv = compose_config(["experiment=cpu_pcam_cv", f"data.root={data_roots['folders']}"])
    validate_training(cv)
    assert (cv.cv.name, cv.cv.folds, cv.data.val_dir, cv.backbone.input_size) == ("kfold", 3, "valid", 160)


@pytest.mark.parametrize(("group", "option"), list(_options()))
def test_every_group_option_composes_and_validates(group, option, data_roots, tmp_path):
    overrides = with_data_root([f"{group}={option}"], data_roots)
    if group == "experiment":
        weights = tmp_path / "w.h5"
        weights.write_bytes(b"stand-in")
        overrides.append(f"backbone.weights={weights}")
    cfg = compose_config(overrides)
    validate_training(cfg)
    if group not in ("paths", "tracking", "trainer", "experiment", "hparams_search", "debug"):
        assert cfg[group].name == option


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_builds_its_model(experiment, data_roots):
    from histo_transfer.models.classifier import build_classifier

    cfg = compose_config(with_data_root([f"experiment={experiment}", "backbone.weights=null"], data_roots))
    validate_training(cfg)
    model, backbone = build_classifier(cfg.backbone, cfg.head)
    assert model.input_shape == (None, 96, 96, 3) and model.output_shape == (None, 1)
    assert backbone.model.input_shape[1:3] == (cfg.backbone.input_size, cfg.backbone.input_size)
    assert model.name == f"{cfg.backbone.name}_classifier"


@pytest.mark.parametrize("group", ["data", "backbone", "augmentation", "optimizer", "tuner", "cv"])
def test_each_registered_option_has_its_yaml_and_each_yaml_its_option(group):
    """Adding an option is one registration plus one YAML file: neither may be forgotten."""
    from histo_transfer.data.augment import AUGMENTATIONS
    from histo_transfer.data.sources import SOURCES
    from histo_transfer.models.backbones import BACKBONES
    from histo_transfer.training.optim import OPTIMIZERS
    from histo_transfer.workflows.cv_schemes import CV
    from histo_transfer.workflows.tuners import TUNERS

    registry = {"data": SOURCES, "backbone": BACKBONES, "augmentation": AUGMENTATIONS, "optimizer": OPTIMIZERS,
                "tuner": TUNERS, "cv": CV}[group]
    yaml_names = {p.stem for p in (CONF_DIR / group).glob("[!_]*.yaml")}
    assert yaml_names == set(registry.names())


def test_default_config_is_the_offline_built_in_run(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by MLflow in this process by other tests
    cfg = compose_config([])
    validate_training(cfg)
    assert cfg.data.name == "synthetic" and not OmegaConf.missing_keys(cfg)  # runs with no argument at all
    assert cfg.tracking.uri == f"sqlite:///{CONF_DIR.parent}/mlruns/mlflow.db"  # the project's own store


def test_mlflow_tracking_uri_environment_overrides_the_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert compose_config([]).tracking.uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.frac=0"], "data.frac: 0 is out of range"),
    (["data.frac=1.5"], "data.frac: 1.5 is out of range"),
    (["data.val_split=1"], "data.val_split"),
    (["data=kaggle"], "data=kaggle needs data.root=PATH"),
    (["backbone.fine_tune_fraction=2"], "backbone.fine_tune_fraction"),
    (["backbone.weights=/nowhere/w.h5"], "backbone.weights: '/nowhere/w.h5' is neither"),
    (["backbone=tiny_cnn", "backbone.weights=imagenet"], "tiny_cnn has no pretrained weights"),
    (["backbone=mobilenet_v1", "backbone.alpha=0.3"], "backbone.alpha: 0.3 is not one of"),
    (["backbone=inceptionresnetv2", "backbone.input_size=64"], "backbone.input_size: 64 is too small"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer.schedule=linear"], "optimizer.schedule: 'linear' is not one of"),
    (["trainer.epochs=-1"], "trainer.epochs"),
    (["trainer.batch_size=abc"], "trainer.batch_size: must be a whole number"),
    (["trainer.mixed_precision=maybe"], "trainer.mixed_precision"),
    (["head.dropout=1"], "head.dropout"),
    (["tuner=random", "tuner.max_trials=0"], "tuner.max_trials: 0 is too small"),
    (["tuner=random", "tuner.search_space.lr.min=0"], "tuner.search_space.lr.min: 0 is out of range"),
    (["tuner=random", "tuner.search_space.dropout={min: 0.5, max: 0.2}"], "tuner.search_space.dropout.max"),
    (["objective.metric=val_f1"], "objective.metric: 'val_f1' is not one of val_loss"),
    (["objective.mode=up"], "objective.mode: 'up' is not one of max, min"),
    (["trainer.profile_batches=[5,2]"], "trainer.profile_batches: [5, 2] is not [first, last]"),
    (["trainer.strategy=tpu"], "trainer.strategy: 'tpu' is not one of auto"),
    (["cv=kfold", "cv.folds=1"], "cv.folds: 1 is too small; need at least 2"),
    (["cv=kfold", "cv.fold=5"], "cv.fold: 5 is out of range; need 0 <= fold < cv.folds=5"),
    (["cv=kfold", "tuner=random"], "cv: a keras-tuner search (tuner=...) cannot also be cross-validated"),
    (["augmentation=strong", "augmentation.stain_sigma=2"], "augmentation.stain_sigma: 2 is out of range"),
])
def test_wrong_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_training(compose_config(overrides))


def test_kaggle_root_that_is_not_a_kaggle_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="not a Kaggle layout: missing train_labels.csv"):
        validate_training(compose_config(["data=kaggle", f"data.root={tmp_path}"]))


@pytest.mark.parametrize(("overrides", "message"), [
    (["backbone=resnet"], "backbone=resnet: no such option; choose one of densenet201"),
    (["trainer.epoch=3"], "trainer.epoch"),
    (["backbone=tiny_cnn,nope"], "backbone=nope: no such option"),
    (["data.frac=0.5,7"], "data.frac: 7 is out of range"),
])
def test_precheck_covers_composition_and_every_sweep_value(overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        precheck(CONF_DIR, "config", overrides, validate_training)


@pytest.mark.parametrize(("args", "message"), [
    (["backbone=nope"], "error: backbone=nope: no such option"),
    (["data.frac=1.5"], "error: data.frac: 1.5 is out of range"),
    (["data=kaggle"], "error: data.root: data=kaggle needs data.root=PATH"),
    (["data=kaggle", "data.root=/definitely/not/here"], "error: data.root: /definitely/not/here is not a folder"),
    (["-m", "backbone=tiny_cnn,nope"], "error: backbone=nope: no such option"),
])
def test_cli_config_errors_exit_2_with_one_line(args, message):
    result = run_cli(args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(("text", "expected"), [
    ("http://alice:pw@host:5000/x", "http://***@host:5000/x"),
    ("tracking.uri=postgresql://u:p@db/mlflow other=1", "tracking.uri=postgresql://***@db/mlflow other=1"),
    ("s3://bucket/key", "s3://bucket/key"),
    ("sqlite:////work/mlruns/mlflow.db", "sqlite:////work/mlruns/mlflow.db"),
    ("https://ghp_tok3n@mlflow.internal", "https://***@mlflow.internal"),  # a token as the user name
    # as Hydra passes a sweep's override to its jobs, colons escaped
    ("tracking.uri=https\\://alice\\:pw@host\\:5000", "tracking.uri=https\\://***@host\\:5000"),
])
def test_credentials_in_uris_are_redacted(text, expected):
    from histo_transfer.tracking.redaction import redact_uri

    assert redact_uri(text) == expected


def test_a_user_or_password_in_a_server_uri_is_refused_before_hydra_writes_it_anywhere(tmp_path):
    from histo_transfer.tracking.access import refuse_credentials_in_uri

    with pytest.raises(ConfigError, match="carries a user name or password"):
        refuse_credentials_in_uri("https://alice:p%40ss@mlflow.internal:5000/x")
    refuse_credentials_in_uri("http://127.0.0.1:5000")  # none: fine
    refuse_credentials_in_uri("postgresql://u:p@db/mlflow")  # a database's own login: MLflow has no other place for it
    result = run_cli(["tracking=server", "tracking.uri=https://alice:s3cr3t@mlflow.internal", f"paths.output_dir={tmp_path}"])
    assert result.returncode == 2 and "tracking.uri: https://***@mlflow.internal carries" in result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr and not list(tmp_path.iterdir())  # no .hydra/ written


def test_what_runs_write_under_the_project_root_is_ignored_by_git():
    """paths.output_dir and paths.cache_dir default to the project root: no run output may show up as
    a change to commit (the outbox's unsent/ once did, while a run was sending)."""
    import shutil
    import subprocess

    from conftest import ROOT

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to ignore")
    written = ["outputs/x.png", "multirun/x", "checkpoints/x", "unsent/run/outbox.json", "mlruns/mlflow.db",
               ".cache/x", "submission.csv"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(written)


def test_help_names_the_program_says_what_it_does_and_lists_only_user_choices():
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("train.py: one training run, a keras-tuner search")
    assert "powered by Hydra" not in result.stdout and "_common" not in result.stdout
    groups = {line.split()[0]: line for line in result.stdout.split("Config groups")[1].split("Config (")[0]
              .splitlines()[1:] if line.strip()}
    assert {"backbone", "data", "optimizer", "cv", "hydra/launcher"} <= set(groups) and "hydra/job_logging" not in groups
    assert "mobilenetv2*" in groups["backbone"] and "tiny_cnn" in groups["backbone"] and "(null*)" in groups["cv"]
    assert "slurm" in groups["hydra/launcher"] and "basic*" in groups["hydra/launcher"]
    chosen = run_cli(["--help", "backbone=tiny_cnn"])
    assert "tiny_cnn*" in chosen.stdout and "mobilenetv2*" not in chosen.stdout  # the screen follows overrides


def test_a_configs_key_ignores_where_a_machine_keeps_things_but_not_what_is_trained(tmp_path):
    """The key finds an interrupted run's state: the same run resumed on another node, with other folders
    and the server under another name, keeps it; another data root or epoch count does not."""
    from histo_transfer.config.identity import run_key

    base = ["data.root=/data/pcam", "tracking.uri=https://mlflow.internal:5000"]
    key = run_key(compose_config(base))
    elsewhere = [f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"trainer.checkpoint_dir={tmp_path / 'ckpt'}", "trainer.resume=true", "trainer.progress=none",
                 "tracking.uri=https://10.0.0.5:5000", "tracking.upload_checkpoints=true", "tracking.system_metrics=false",
                 "+tracking.tags.node=gpu07"]
    assert run_key(compose_config([*base, *elsewhere])) == key
    assert run_key(compose_config([*base, "data.root=/data/other"])) != key
    assert run_key(compose_config([*base, "trainer.epochs=6"])) != key
    assert run_key(compose_config([*base, "tracking.experiment=other"])) != key
