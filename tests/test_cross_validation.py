"""k-fold cross-validation, fold ensembles as models, and the exported ensemble."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import CONF_DIR, ROOT, TINY_RUN, compose_config, run_cli, store_overrides, write_kaggle_layout
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from histo_transfer.config.errors import ConfigError
from histo_transfer.data.folds import assign_folds

TINY_CV = [o for o in TINY_RUN if not o.startswith("trainer.epochs")] + ["trainer.epochs=1", "cv=kfold", "cv.folds=2"]


def runs_of(uri, recipe: int = 0):
    """The store's CV parent (the `recipe`-th started, where a sweep ran several) and its folds."""
    client = MlflowClient(uri)
    runs = client.search_runs(["1"], max_results=100, order_by=["attributes.start_time ASC"])
    parent = [r for r in runs if r.data.tags.get("kind") == "cv"][recipe]
    folds = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                   key=lambda r: int(r.data.tags["cv.fold"]))
    return client, parent, folds


def artifact_csv(run_id, path, uri):
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri),
                       dtype={"id": str})


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """Two recipes as a sweep of 2-fold CVs of the tiny model on 160 built-in patches, through
    `python train.py -m`: most tests read the first (lr 0.001); compare_cv pairs the two."""
    tmp = tmp_path_factory.mktemp("cv")
    result = run_cli(["-m", *TINY_CV, "cv.tta=flips", *store_overrides(tmp), "optimizer.lr=0.001,0.01"])
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    client, parent, folds = runs_of(uri)
    return {"tmp": tmp, "uri": uri, "client": client, "parent": parent, "folds": folds}


@pytest.mark.slow
def test_cv_is_one_parent_with_a_complete_nested_run_per_fold(cv_run):
    parent, folds, client = cv_run["parent"], cv_run["folds"], cv_run["client"]
    assert parent.info.status == "FINISHED" and parent.data.tags["cv.grouped"] == "false"
    assert [f.data.tags["cv.fold"] for f in folds] == ["0", "1"]
    for fold in folds:
        assert fold.info.status == "FINISHED"
        assert "model/model.keras" in {a.path for a in client.list_artifacts(fold.info.run_id, "model")}
        assert fold.data.metrics["n_train"] + fold.data.metrics["n_val"] == 160  # every patch, no val_split
    per_fold = [f.data.metrics["best_val_auc"] for f in folds]
    assert parent.data.metrics["cv_auc_mean"] == pytest.approx(np.mean(per_fold))
    assert parent.data.metrics["cv_auc_std"] == pytest.approx(np.std(per_fold))
    assert {"cv/folds.csv", "cv/oof_predictions.csv", "cv/folds.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert "evaluation/roc.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}


@pytest.mark.slow
def test_out_of_fold_predictions_cover_every_patch_once_and_give_the_honest_auc(cv_run):
    parent, uri = cv_run["parent"], cv_run["uri"]
    assignment = artifact_csv(parent.info.run_id, "cv/folds.csv", uri)
    oof = artifact_csv(parent.info.run_id, "cv/oof_predictions.csv", uri)
    assert list(oof.columns) == ["id", "label", "fold", "probability", "probability_flips"]
    assert len(oof) == 160 and oof["id"].is_unique and set(oof["id"]) == set(assignment["id"])
    assert oof.set_index("id")["fold"].to_dict() == assignment.set_index("id")["fold"].to_dict()
    for fold in cv_run["folds"]:  # each fold's predictions are its own validation patches
        mine = artifact_csv(fold.info.run_id, "evaluation/predictions.csv", uri)
        number = int(fold.data.tags["cv.fold"])
        assert set(mine["id"]) == set(oof.loc[oof["fold"] == number, "id"])
    assert parent.data.metrics["oof_auc"] == pytest.approx(roc_auc_score(oof["label"], oof["probability"]))
    assert parent.data.metrics["oof_auc_ci_low"] <= parent.data.metrics["oof_auc"] <= parent.data.metrics["oof_auc_ci_high"]
    # cv.tta=flips: each fold's model again on its own fold, 4 views averaged
    assert parent.data.metrics["oof_auc_tta"] == pytest.approx(roc_auc_score(oof["label"], oof["probability_flips"]))
    assert not np.allclose(oof["probability_flips"], oof["probability"])


def test_groups_never_share_a_fold_and_stay_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"slide{i}" for i in range(30)], 10)
    labels = (rng.random(300) < 0.4).astype(int)
    folds = assign_folds(labels, groups, 5, seed=1)
    for slide in np.unique(groups):
        assert len(set(folds[groups == slide])) == 1
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    ungrouped = assign_folds(labels, None, 5, seed=1)
    assert all(abs(labels[ungrouped == k].mean() - labels.mean()) < 0.05 for k in range(5))
    with pytest.raises(ConfigError, match="cv.folds: cannot make 5 folds"):
        assign_folds(np.array([0, 1, 0, 1]), None, 5, seed=1)


def test_kaggle_groups_csv_maps_slides_and_unlisted_ids_become_their_own_group(tmp_path):
    from histo_transfer.data.sources import data_source

    ids = write_kaggle_layout(tmp_path / "kaggle", [0, 1] * 6)
    (tmp_path / "groups.csv").write_text("id,wsi\n" + "".join(f"{i},slide{n % 3}\n" for n, i in enumerate(ids[:9])))
    cfg = compose_config([*store_overrides(tmp_path), "data=kaggle", f"data.root={tmp_path / 'kaggle'}",
                          f"data.groups_csv={tmp_path / 'groups.csv'}"])
    source = data_source(cfg.data)
    labelled = source.labelled()
    groups = dict(zip(labelled.patches.ids, source.groups(labelled)))
    assert groups[ids[0]] == groups[ids[3]] == "slide0" and groups[ids[1]] == "slide1"
    assert len({groups[i] for i in ids[9:]}) == 3 and not {groups[i] for i in ids[9:]} & {"slide0", "slide1", "slide2"}


@pytest.mark.slow
def test_an_interrupted_cv_resumes_into_the_same_parent(tmp_path):
    args = [o for o in TINY_CV if not o.startswith(("trainer.epochs", "data.n_train"))] + [
        "data.n_train=900", "trainer.epochs=3", *store_overrides(tmp_path)]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    deadline = time.time() + 400
    while not (_fold_finished(uri, "0") and list((tmp_path / "checkpoints").glob("*/epoch_0001/progress.json"))):
        assert process.poll() is None, process.communicate()[1][-3000:]  # fold 0's state is gone: this is fold 1
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "trainer.resume=true" in stderr.strip().splitlines()[-1]
    _, parent, folds = runs_of(uri)
    assert parent.info.status == "KILLED"
    first = {f.data.tags["cv.fold"]: (f.info.run_id, f.info.status) for f in folds}
    assert first["0"][1] == "FINISHED" and first["1"][1] == "KILLED"

    result = run_cli([*args, "trainer.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    _, again, folds = runs_of(uri)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert [f.info.status for f in folds] == ["FINISHED"] * 2
    now = {f.data.tags["cv.fold"]: f.info.run_id for f in folds}
    assert now["0"] == first["0"][0] and now["1"] == first["1"][0]  # kept, and resumed in place
    assert "oof_auc" in again.data.metrics


def _fold_finished(uri, number) -> bool:
    """Read-only SQL on the store the training process is writing: an MlflowClient here would run
    MLflow's schema migration concurrently with the trainer's own (a race that crashed it once)."""
    import contextlib
    import sqlite3

    path = uri.removeprefix("sqlite:///")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            rows = db.execute("SELECT runs.status FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                              "WHERE tags.key = 'cv.fold' AND tags.value = ?", (number,)).fetchall()
    except sqlite3.Error:  # not created yet, or its tables not yet
        return False
    return any(status == "FINISHED" for (status,) in rows)


@pytest.mark.slow
def test_single_fold_jobs_of_a_sweep_share_one_cv_parent(tmp_path):
    result = run_cli(["-m", *TINY_CV, "cv.fold=0,1", *store_overrides(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    _, parent, folds = runs_of(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert [f.data.tags["cv.fold"] for f in folds] == ["0", "1"]
    assert parent.info.status == "FINISHED" and "oof_auc" in parent.data.metrics


def scoring(cv_run, name, *extra):
    from hydra import compose, initialize_config_dir

    data = [] if name == "register" else ["data.n_train=160", "data.n_test=8"]  # register composes no data group
    keep = [*store_overrides(cv_run["tmp"]), *data]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*keep, *extra])


@pytest.mark.slow
def test_every_kind_of_model_reference_scores_as_an_ensemble(cv_run, tmp_path):
    from histo_transfer.tracking.registry import member_refs
    from histo_transfer.workflows.scoring import evaluate, predict

    mlflow.set_tracking_uri(cv_run["uri"])
    parent, folds = cv_run["parent"].info.run_id, [f.info.run_id for f in cv_run["folds"]]
    assert member_refs(parent) == folds  # a CV parent: its folds, in order
    assert member_refs([folds[1], folds[0]]) == [folds[1], folds[0]]  # a list, in its order
    metrics = evaluate(scoring(cv_run, "evaluate", f"model={parent}", "tta=flips"))
    single = evaluate(scoring(cv_run, "evaluate", f"model={folds[0]}"))
    ranked = evaluate(scoring(cv_run, "evaluate", f"model=[{folds[0]},{folds[1]}]", "ensemble.method=rank"))
    runs = {r.data.tags.get("model_ref"): r for r in MlflowClient(cv_run["uri"]).search_runs(
        ["1"], filter_string="tags.kind = 'evaluate'")}
    assert runs[parent].data.tags["n_members"] == "2" and runs[parent].data.tags["members"] == ",".join(folds)
    assert runs[folds[0]].data.tags["source_run_id"] == folds[0]
    assert metrics["auc"] != single["auc"] and 0 <= ranked["auc"] <= 1
    output = tmp_path / "submission.csv"
    predict(scoring(cv_run, "predict", f"model={parent}", f"output={output}"))
    assert len(pd.read_csv(output)) == 8


@pytest.mark.slow
def test_exported_ensemble_reloads_alone_and_equals_the_members_mean(cv_run, tmp_path):
    from histo_transfer.evaluation.inference import ensemble_probabilities
    from histo_transfer.tasks.register import main as register_from_config
    from histo_transfer.tracking.registry import load_models

    mlflow.set_tracking_uri(cv_run["uri"])
    parent = cv_run["parent"].info.run_id
    version = register_from_config(scoring(cv_run, "register", f"model={parent}", "export.tta=dihedral8",
                                           "name=cv-ensemble"))
    client = MlflowClient(cv_run["uri"])
    exported = client.get_run(client.get_model_version("cv-ensemble", version).run_id)
    assert exported.data.tags["kind"] == "export" and exported.data.tags["n_members"] == "2"
    path = mlflow.artifacts.download_artifacts(run_id=exported.info.run_id, artifact_path="model/model.keras",
                                               dst_path=str(tmp_path))
    patches = np.random.default_rng(0).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    np.save(tmp_path / "patches.npy", patches)
    script = (f"import keras, numpy as np; m = keras.models.load_model({path!r}, safe_mode=True);"
              f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(np.load({str(tmp_path / 'patches.npy')!r}), verbose=0))")
    subprocess.run([sys.executable, "-I", "-c", script], check=True, capture_output=True, timeout=300)
    alone = np.load(tmp_path / "out.npy")
    members = [m.model for m in load_models(parent)]
    expected = ensemble_probabilities(members, patches, tta="dihedral8")
    assert alone.shape == (6, 1) and np.abs(alone[:, 0] - expected).max() < 1e-5


@pytest.mark.slow
def test_a_student_distilled_from_the_fold_ensemble_is_one_model(cv_run):
    """distill.teacher = the CV parent: the folds' mean (with flips) teaches one model of one model's size."""
    from histo_transfer.tasks.train import main as train
    from histo_transfer.tracking.registry import load_model

    folds = [f.info.run_id for f in cv_run["folds"]]
    cfg = compose_config([*TINY_RUN, *store_overrides(cv_run["tmp"]), "tracking.experiment=students",
                          f"distill.teacher={cv_run['parent'].info.run_id}", "distill.tta=flips"])
    train(cfg)
    client = cv_run["client"]
    [student] = client.search_runs([client.get_experiment_by_name("students").experiment_id])
    assert student.info.status == "FINISHED" and student.data.tags["distill_teacher_members"] == ",".join(folds)
    mlflow.set_tracking_uri(cv_run["uri"])
    one = load_model(student.info.run_id).model
    assert one.count_params() == load_model(folds[0]).model.count_params()  # one model, not the ensemble


@pytest.mark.slow
def test_compare_cv_pairs_recipes_on_the_same_out_of_fold_patches(cv_run):
    from histo_transfer.workflows.comparison import compare

    # the fixture's two recipes: a sweep of cross-validations on the same data and folds
    client = cv_run["client"]
    [sweep] = client.search_runs(["1"], "tags.kind = 'sweep'")
    jobs = client.search_runs(["1"], "tags.kind = 'cv'", order_by=["attributes.start_time ASC"])
    assert [job.data.params["optimizer.lr"] for job in jobs] == ["0.001", "0.01"]
    baseline, other = jobs
    assert baseline.info.run_id == cv_run["parent"].info.run_id
    ids = [baseline.info.run_id, other.info.run_id]

    mlflow.set_tracking_uri(cv_run["uri"])
    table = compare(ids, seed=0)
    assert table["run"].tolist() == ids
    assert table["oof_auc"].tolist() == pytest.approx([baseline.data.metrics["oof_auc"], other.data.metrics["oof_auc"]])
    assert table["oof_auc_flips"].tolist() == pytest.approx([baseline.data.metrics["oof_auc_tta"],
                                                             other.data.metrics["oof_auc_tta"]])
    assert table["recipe"].tolist() == ["optimizer.lr=0.001", "optimizer.lr=0.01"]  # what differs, tracking aside
    first, second = table.iloc[0], table.iloc[1]
    assert first["oof_auc_diff"] == 0 and first["oof_auc_ahead"] == 0
    assert second["oof_auc_diff"] == pytest.approx(second["oof_auc"] - first["oof_auc"])
    assert second["oof_auc_diff_low"] <= second["oof_auc_diff"] <= second["oof_auc_diff_high"]
    assert 0 <= second["oof_auc_ahead"] <= 1 and second["wall_s"] > 0

    printed = run_cli([f"runs=[{ids[0]},{ids[1]}]", f"tracking.uri={cv_run['uri']}"], script="scripts/compare_cv.py")
    assert printed.returncode == 0, printed.stderr[-3000:]
    lines = [line for line in printed.stdout.splitlines() if line.startswith("| `")]
    assert [line.split(" | ")[1] for line in lines] == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert f"{second['oof_auc_diff']:+.4f}" in lines[1] and "with flips TTA" in printed.stdout

    # a sweep parent stands for its cross-validations, the first job as the baseline
    swept = run_cli([f"runs={sweep.info.run_id}", f"tracking.uri={cv_run['uri']}"], script="scripts/compare_cv.py")
    assert swept.returncode == 0, swept.stderr[-3000:]
    rows = [line.split(" | ") for line in swept.stdout.splitlines() if line.startswith("| `")]
    assert [row[0].strip("|` ") for row in rows] == [job.info.run_id for job in jobs]
    assert [row[1] for row in rows] == ["optimizer.lr=0.001", "optimizer.lr=0.01"]

    fold = cv_run["folds"][0].info.run_id  # a fold's run is not a cross-validation
    refused = run_cli([f"runs=[{ids[0]},{fold}]", f"tracking.uri={cv_run['uri']}"], script="scripts/compare_cv.py")
    assert refused.returncode == 2 and f"run {fold} is not a finished cross-validation" in refused.stderr
    assert "Traceback" not in refused.stderr
