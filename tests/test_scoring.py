"""predict.py, evaluate.py, TTA, submissions, the model registry and safe loading."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import CONF_DIR, free_port, loopback_server, run_cli
from mlflow.tracking import MlflowClient

from histo_transfer.config.errors import ConfigError, UserError
from histo_transfer.data.images import read_patches
from histo_transfer.data.kaggle import read_labelled, unlabelled_ids
from histo_transfer.evaluation.inference import SubmissionError, predict_probabilities, submission_frame
from histo_transfer.tracking.registry import load_model, register
from histo_transfer.workflows.scoring import evaluate, predict



def scoring_config(trained_run, name, *extra):
    """The trained run's data and store, composed as predict.py / evaluate.py compose theirs."""
    from hydra import compose, initialize_config_dir

    keep = [o for o in trained_run["overrides"] if o.startswith(("data.", "paths.", "tracking."))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*keep, *extra])


@pytest.fixture
def trained(trained_run):
    run_id = trained_run["run"].info.run_id
    root = trained_run["tmp"] / "cache" / "synthetic" / "v2_160x8"
    return {**trained_run, "run_id": run_id, "root": root, "model": load_model(run_id).model}


def _test_images(root):
    ids = unlabelled_ids(root)
    return ids, read_patches([root / "test" / f"{i}.tif" for i in ids])


@pytest.mark.slow
def test_predict_writes_a_checked_submission_linked_to_the_model_run(trained, tmp_path):
    output = tmp_path / "submission.csv"
    predict(scoring_config(trained, "predict", f"model={trained['run_id']}", f"output={output}"))
    submission = pd.read_csv(output, dtype={"id": str})
    ids, images = _test_images(trained["root"])
    assert list(submission.columns) == ["id", "label"] and submission["id"].tolist() == ids
    expected = trained["model"].predict(images, verbose=0)[:, 0]
    assert np.allclose(submission["label"], expected, atol=1e-6)
    [run] = MlflowClient(trained["uri"]).search_runs(["1"], "tags.kind = 'predict'", max_results=1)
    assert run.info.status == "FINISHED" and run.data.tags["source_run_id"] == trained["run_id"]
    assert [a.path for a in MlflowClient(trained["uri"]).list_artifacts(run.info.run_id, "submission")] == [
        "submission/submission.csv"]


@pytest.mark.slow
def test_submission_follows_sample_submission_order(trained, tmp_path):
    ids, _ = _test_images(trained["root"])
    template = trained["root"] / "sample_submission.csv"
    template.write_text("id,label\n" + "".join(f"{i},0\n" for i in reversed(ids)))
    try:
        output = tmp_path / "s.csv"
        predict(scoring_config(trained, "predict", f"model={trained['run_id']}", f"output={output}"))
        assert pd.read_csv(output, dtype={"id": str})["id"].tolist() == list(reversed(ids))
    finally:
        template.unlink()


@pytest.mark.slow
@pytest.mark.parametrize(("tta", "views"), [("flips", 4), ("dihedral8", 8)])
def test_tta_averages_the_views(trained, tta, views):
    _, images = _test_images(trained["root"])
    model = trained["model"]
    if tta == "flips":
        transformed = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    else:
        rotations = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
        transformed = rotations + [r[:, :, ::-1] for r in rotations]
    assert len(transformed) == views
    expected = np.mean([model.predict(np.ascontiguousarray(v), verbose=0)[:, 0] for v in transformed], axis=0)
    got = predict_probabilities(model, images, batch_size=3, tta=tta, progress=False)
    assert np.allclose(got, expected, atol=1e-5)


def test_an_ensemble_is_scored_without_tensorflows_retracing_warning_or_onednns_uint8_line(caplog, capfd):
    """Each member needs its own traces (and one for a smaller last batch): none is a user's problem. Nor is
    oneDNN's "supports DT_UINT8 only on platforms with AVX-512", which uint8 views printed (C++, on fd 2)."""
    from histo_transfer.evaluation.inference import ensemble_probabilities

    def member():
        inputs = keras.Input((96, 96, 3))
        pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
        return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled))

    images = np.random.default_rng(0).integers(0, 256, (70, 96, 96, 3)).astype(np.uint8)
    with caplog.at_level("WARNING", logger="tensorflow"):
        probabilities = ensemble_probabilities([member() for _ in range(6)], images, batch_size=32, tta="dihedral8")
    assert probabilities.shape == (70,) and np.isfinite(probabilities).all()
    assert not [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert "DT_UINT8" not in capfd.readouterr().err


@pytest.mark.parametrize(("ids", "labels", "message"), [
    (["a", "b"], [0.1, 0.2], "lacks id c (1 missing of 3)"),
    (["a", "b", "b", "c"], [0.1, 0.2, 0.2, 0.3], "has id b more than once"),
    (["a", "b", "c", "d"], [0.1, 0.2, 0.3, 0.4], "has id d that is not a test patch"),
    (["a", "b", "c"], [0.1, float("nan"), 0.3], "label of id b is NaN"),
    (["a", "b", "c"], [0.1, 1.2, 0.3], "label 1.2 of id b is outside"),
])
def test_bad_submissions_are_refused(ids, labels, message):
    with pytest.raises(SubmissionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        submission_frame(ids, labels, expected_ids=["a", "b", "c"])


@pytest.mark.slow
def test_evaluate_reports_on_a_labelled_folder(trained):
    metrics = evaluate(scoring_config(trained, "evaluate", f"model={trained['run_id']}", "tta=flips"))
    client = MlflowClient(trained["uri"])
    [run] = client.search_runs(["1"], "tags.kind = 'evaluate'", max_results=1)
    assert run.info.status == "FINISHED" and run.data.tags["eval_split"] == "all"
    assert run.data.metrics["eval/auc"] == pytest.approx(metrics["auc"])
    assert run.data.metrics["eval/images_per_second"] > 0  # the model's prediction cost, TTA views included
    assert metrics["n"] == 160  # every labelled patch of the folder
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/pr.png", "evaluation/reliability.png",
            "evaluation/confusion.png", "evaluation/metrics.json"} <= names
    listing = read_labelled(trained["root"])
    assert metrics["positive_fraction"] == pytest.approx(listing.labels.mean())
    [scored] = client.get_run(run.info.run_id).inputs.dataset_inputs  # what it scored, for the UI
    assert scored.tags[0].value == "evaluation" and json.loads(scored.dataset.profile)["num_rows"] == 160
    assert "cam_centre_fraction" in metrics  # one model: where it looks, on its true positives


@pytest.mark.slow
def test_registered_model_is_usable_by_alias_and_version(trained, tmp_path):
    version = register(trained["run_id"], "pcam-classifier", "champion")
    _, images = _test_images(trained["root"])
    expected = trained["model"].predict(images, verbose=0)
    for ref in ("models:/pcam-classifier@champion", f"models:/pcam-classifier/{version}"):
        loaded = load_model(ref)
        assert loaded.source_run_id == trained["run_id"]
        assert np.allclose(loaded.model.predict(images, verbose=0), expected, atol=1e-6)
    # and through the command line, as README shows it
    result = run_cli([*[o for o in trained["overrides"] if o.startswith(("data.", "paths.", "tracking."))],
                      "model=models:/pcam-classifier@champion", f"output={tmp_path / 'cli.csv'}", "tta=dihedral8"],
                     script="predict.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "cli.csv")) == 8


def test_unknown_model_reference_is_a_config_error():
    with pytest.raises(ConfigError, match="model: 'nowhere.keras' is neither"):
        load_model("nowhere.keras")


def test_model_with_arbitrary_code_is_refused(tmp_path):
    inputs = keras.Input((96, 96, 3))
    outputs = keras.layers.Lambda(lambda x: x[:, :1, 0, 0])(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(UserError, match="refused, the file carries arbitrary Python code"):
        load_model(str(path))


@pytest.mark.slow
def test_mlflow_model_serving_answers_like_the_model(trained):
    """`mlflow models serve --env-manager local` on a loopback port, posting real patches."""
    import json
    import sys
    import urllib.request

    [logged] = mlflow.search_logged_models(experiment_ids=[trained["run"].info.experiment_id],
                                           filter_string=f"source_run_id = '{trained['run_id']}'", output_format="list")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged.model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with loopback_server(command, f"{url}/ping", env={"MLFLOW_TRACKING_URI": trained["uri"]}):
        _, images = _test_images(trained["root"])
        body = json.dumps({"inputs": images.astype(np.float32).tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    served = np.asarray(answer["predictions"], dtype=np.float32).reshape(-1)
    assert np.allclose(served, trained["model"].predict(images, verbose=0)[:, 0], atol=1e-5)


@pytest.mark.slow
def test_grad_cam_maps_and_the_centre_fraction(trained):
    from histo_transfer.evaluation.gradcam import centre_fraction, grad_cam

    patches = np.random.default_rng(3).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    heat = grad_cam(trained["model"], patches)
    assert heat.shape == (4, 96, 96) and heat.min() >= 0 and np.allclose(heat.max(axis=(1, 2)), 1)
    assert centre_fraction(np.ones((2, 96, 96))) == pytest.approx(32 * 32 / 96**2)
    blob = np.zeros((1, 96, 96))
    blob[0, 40:56, 40:56] = 1
    assert centre_fraction(blob) == 1.0


@pytest.mark.slow
def test_explain_script_renders_chosen_patches(trained, tmp_path):
    ids = read_labelled(trained["root"]).ids[:3].tolist()
    output = tmp_path / "why.png"
    keep = [o for o in trained["overrides"] if o.startswith(("data.", "paths.", "tracking."))]
    result = run_cli([f"model={trained['run_id']}", f"ids=[{','.join(ids)}]", f"output={output}", *keep],
                     script="scripts/explain.py")
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    assert Image.open(output).size == (660, 480)  # 3 patches of 2.2 in at 100 dpi, as stored and under their heat maps
    runs = MlflowClient(trained["uri"]).search_runs(["1"], filter_string="tags.kind = 'explain'")
    assert len(runs) == 1 and runs[0].data.tags["source_run_id"] == trained["run_id"]
    missing = run_cli([f"model={trained['run_id']}", "ids=[nope]", *keep], script="scripts/explain.py")
    assert missing.returncode == 2 and "ids: 'nope' is not a patch" in missing.stderr
