"""A team's tracking server, for real: `scripts/tracking_server.sh --auth` over PostgreSQL, on 127.0.0.2
with HTTPS (a certificate made here), users and permissions, proxied artifacts, a restart mid-sweep.

Started on a loopback address other than 127.0.0.1, so that the Host headers and browser origins it
accepts are the ones derived from --host, as on a shared machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import requests
from conftest import ROOT, TINY_RUN, free_port, loopback_server, run_cli
from mlflow.tracking import MlflowClient
from test_scaleout import EPOCH_METRICS, PG_BIN, has_module, require

SERVICE = [pytest.mark.scaleout, pytest.mark.slow]  # the tests that start the server; the refusals start nothing
HOST = "127.0.0.2"
ADMIN = ("admin", "adm1n-Pass-for-tests-7431")
EDITOR = ("editor", "ed1tor-Pass-for-tests-9902")
READER = ("reader", "re4der-Pass-for-tests-5527")
STRANGER = ("stranger", "str4nger-Pass-for-tests-3318")  # DENY on the experiment
SCRIPT = ROOT / "scripts" / "tracking_server.sh"


def self_signed_certificate(folder: Path, ip: str) -> tuple[Path, Path]:
    """A certificate for `ip` that signs itself, as a team's own CA would sign the server's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    cert, private = folder / "server.crt", folder / "server.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    return cert, private


class TeamServer:
    """The server as a team runs it; stopped and started again on the same port, cluster and users."""

    def __init__(self, folder: Path):
        self.port, self.pg_port = free_port(), free_port()
        self.pgdata = folder / "pgdata"  # with --auth, PostgreSQL listens on its socket there only
        self.uri = f"https://{HOST}:{self.port}"
        self.cert, key = self_signed_certificate(folder, HOST)
        password_file = folder / "admin.pw"
        password_file.write_text(ADMIN[1] + "\n")
        password_file.chmod(0o600)
        self.command = [str(SCRIPT), "--auth", "--admin-password-file", str(password_file), "--host", HOST,
                        "--port", str(self.port), "--tls-cert", str(self.cert), "--tls-key", str(key),
                        "--backend", "postgres", "--pgdata", str(self.pgdata), "--pg-port", str(self.pg_port),
                        "--artifacts", str(folder / "artifacts")]
        self._running = None

    def answers(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", verify=self.cert, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def start(self):
        self._running = loopback_server(self.command, self.answers)
        self.process = self._running.__enter__()

    def stop(self):
        self._running.__exit__(None, None, None)
        self._running = None

    def call(self, method: str, path: str, user: tuple[str, str] | None, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.uri}/{path}", auth=user, verify=self.cert, timeout=30, **kwargs)

    def api(self, method: str, path: str, user=ADMIN, **kwargs) -> dict:
        response = self.call(method, f"api/2.0/mlflow/{path}", user, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def client_env(self, user: tuple[str, str]) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1],
                "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.cert)}


@pytest.fixture(scope="module")
def team():
    require(PG_BIN.joinpath("initdb").exists(), f"PostgreSQL 15 is not installed ({PG_BIN})")
    require(has_module("psycopg") and has_module("flask_wtf"), "the server extra is not installed (pip install -e '.[server]')")
    # the cluster runs as `postgres` when we are root: its folder must be reachable by that user (pytest's is not)
    folder = Path(tempfile.mkdtemp(prefix="histo-team-"))
    folder.chmod(0o755)
    server = TeamServer(folder)
    server.start()
    # the documented way to add a user: scripts/tracking_users.py, as the admin
    admin_env = {**os.environ, **server.client_env(ADMIN)}
    for user, password in (EDITOR, READER, STRANGER):
        (folder / f"{user}.pw").write_text(password + "\n")
        added = subprocess.run([sys.executable, "scripts/tracking_users.py", "--uri", server.uri, "add", user,
                                "--password-file", str(folder / f"{user}.pw")], cwd=ROOT, env=admin_env,
                               capture_output=True, text=True, timeout=120)
        assert added.returncode == 0, added.stderr
    server.api("POST", "experiments/create", json={"name": "team"})
    for user, permission in ((EDITOR[0], "EDIT"), (READER[0], "READ"), (STRANGER[0], "DENY")):
        granted = subprocess.run([sys.executable, "scripts/tracking_users.py", "--uri", server.uri, "grant", user,
                                  "team", permission], cwd=ROOT, env=admin_env, capture_output=True, text=True, timeout=120)
        assert granted.returncode == 0 and f"{user} has {permission} on experiment team" in granted.stdout, granted.stderr
    yield server
    if server._running:
        server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("args, env, says", [
    (["--host", "0.0.0.0"], {}, "refusing to listen on 0.0.0.0 without --auth"),
    (["--host", "127.corp.example"], {}, "refusing to listen on 127.corp.example without --auth"),
    (["--auth"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "must have 12 characters or more"),
    (["--host", "--auth"], {}, "'--host' needs a value"),
    (["--auth"], {}, "--auth needs the admin's password"),
    (["--auth"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "refusing MLflow's documented default admin password"),
    (["--tls-cert", "server.crt"], {}, "--tls-cert and --tls-key go together"),
])
def test_the_server_never_opens_by_accident(args, env, says):
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    result = subprocess.run([str(SCRIPT), *args], env={**environment, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and says in result.stderr
    assert result.stderr.count("\n") == 1 and not result.stdout  # one line, before anything started


@pytest.mark.scaleout
@pytest.mark.slow
def test_no_request_reaches_runs_artifacts_or_the_registry_without_valid_credentials(team):
    experiment = team.api("GET", "experiments/get-by-name", params={"experiment_name": "team"})["experiment"]
    run_id = team.api("POST", "runs/create", json={"experiment_id": experiment["experiment_id"]})["run"]["info"]["run_id"]
    artifact = f"api/2.0/mlflow-artifacts/artifacts/{experiment['experiment_id']}/{run_id}/artifacts/note.txt"
    assert team.call("PUT", artifact, ADMIN, data=b"admin's note").status_code == 200
    team.api("POST", "registered-models/create", json={"name": "team-model"})

    reads = [f"api/2.0/mlflow/runs/get?run_id={run_id}", "api/2.0/mlflow/experiments/search?max_results=5",
             artifact, f"get-artifact?path=note.txt&run_uuid={run_id}", f"api/2.0/mlflow/artifacts/list?run_id={run_id}",
             "api/2.0/mlflow/registered-models/get?name=team-model", "api/2.0/mlflow/registered-models/search"]
    for path in reads:
        for user in (None, (ADMIN[0], "wrong"), (ADMIN[0], "password1234"), ("nobody", READER[1])):
            assert team.call("GET", path, user).status_code == 401, (path, user)
        assert team.call("GET", path, ADMIN).status_code == 200, path
        assert team.call("GET", path, READER).status_code == 200, path  # READ reads
    assert team.call("GET", artifact, READER).content == b"admin's note"

    # READ does not write: runs, metrics, artifacts, the experiment, the registry
    writes = [("POST", "api/2.0/mlflow/runs/create", {"json": {"experiment_id": experiment["experiment_id"]}}),
              ("POST", "api/2.0/mlflow/runs/log-metric",
               {"json": {"run_id": run_id, "key": "m", "value": 1, "timestamp": 1, "step": 0}}),
              ("PUT", artifact.replace("note.txt", "forged.txt"), {"data": b"x"}),
              ("POST", "api/2.0/mlflow/experiments/delete", {"json": {"experiment_id": experiment["experiment_id"]}}),
              ("PATCH", "api/2.0/mlflow/registered-models/update", {"json": {"name": "team-model", "description": "x"}})]
    for method, path, body in writes:
        assert team.call(method, path, READER, **body).status_code == 403, path
        assert team.call(method, path, None, **body).status_code == 401, path

    # the Host headers and browser origins accepted are those of --host
    assert team.call("GET", "api/2.0/mlflow/experiments/search?max_results=1", ADMIN,
                     headers={"Host": "evil.example"}).status_code == 403
    preflight = {"Access-Control-Request-Method": "POST"}
    foreign = team.call("OPTIONS", "api/2.0/mlflow/runs/create", None, headers={**preflight, "Origin": "https://evil.example"})
    own = team.call("OPTIONS", "api/2.0/mlflow/runs/create", None, headers={**preflight, "Origin": team.uri})
    assert "access-control-allow-origin" not in foreign.headers
    assert own.headers.get("access-control-allow-origin") == team.uri


@pytest.mark.scaleout
@pytest.mark.slow
@pytest.mark.parametrize("sweep", [[], ["-m", "trainer.seed=1,2"]], ids=["run", "sweep"])
def test_a_read_only_user_is_stopped_before_training_and_no_run_is_made(team, tmp_path, monkeypatch, sweep):
    before = len(runs_in_as(team, ADMIN, "team", monkeypatch))
    for key, value in team.client_env(READER).items():
        monkeypatch.setenv(key, value)
    result = run_cli([*sweep, *TINY_RUN, "tracking=server", f"tracking.uri={team.uri}", "tracking.experiment=team",
                      f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [text for text in result.stderr.splitlines() if text.startswith("error")]
    assert "user 'reader' has READ on experiment 'team'" in line and "needs EDIT" in line
    assert f"tracking_users.py --uri {team.uri} grant reader team EDIT" in line
    assert "Traceback" not in result.stderr
    assert len(runs_in_as(team, ADMIN, "team", monkeypatch)) == before


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_user_denied_the_experiment_is_stopped_with_one_line(team, tmp_path, monkeypatch):
    """DENY: the server answers 403 to the experiment's very lookup."""
    for key, value in team.client_env(STRANGER).items():
        monkeypatch.setenv(key, value)
    result = run_cli([*TINY_RUN, "tracking=server", f"tracking.uri={team.uri}", "tracking.experiment=team",
                      f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [text for text in result.stderr.splitlines() if text.startswith("error")]
    assert "user 'stranger' may not see experiment 'team'" in line and "ask an admin for EDIT on it" in line
    assert "Traceback" not in result.stderr and STRANGER[1] not in result.stdout + result.stderr


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_server_name_that_host_does_not_allow_is_one_line_naming_allowed_hosts(team, tmp_path, monkeypatch):
    """The same address under another name (127.0.0.2 written as one number): the server answers its
    /health, then refuses the Host header (MLflow's guard against DNS rebinding)."""
    for key, value in team.client_env(EDITOR).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")  # its certificate names 127.0.0.2, not this name
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    other_name = f"https://{int(ipaddress.ip_address(HOST))}:{team.port}"
    result = run_cli([*TINY_RUN, "tracking=server", f"tracking.uri={other_name}", "tracking.experiment=team",
                      f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [text for text in result.stderr.splitlines() if text.startswith("error")]
    assert "answered /api/2.0/mlflow/users/current with 403 (Invalid Host header" in line
    assert line.endswith("start it with --allowed-hosts naming it") and "Traceback" not in result.stderr


def runs_in_as(team: TeamServer, user, experiment: str, monkeypatch) -> list:
    with monkeypatch.context() as scoped:
        for key, value in team.client_env(user).items():
            scoped.setenv(key, value)
        return _runs_or_none(MlflowClient(team.uri), experiment)


@pytest.mark.scaleout
@pytest.mark.slow
@pytest.mark.parametrize("trust, in_uri, says", [
    ({}, False, "presents a certificate this machine does not trust"),
    ({"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, False, "refused the user 'editor' (401"),
    ({"MLFLOW_TRACKING_SERVER_CERT_PATH": "/nowhere/server.crt"}, False, "MLFLOW_TRACKING_SERVER_CERT_PATH: /nowhere"),
    (None, True, "carries a user name or password"),
], ids=["untrusted", "wrong-password", "no-such-certificate", "credentials-in-the-uri"])
def test_a_client_it_cannot_trust_or_that_it_does_not_know_stops_with_one_line(team, tmp_path, monkeypatch, trust,
                                                                               in_uri, says):
    for key, value in {**team.client_env(EDITOR), **(trust or {})}.items():
        monkeypatch.setenv(key, value)
    if trust == {}:  # the certificate is not one this machine trusts: nothing names it
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    uri = team.uri.replace("://", f"://{EDITOR[0]}:{EDITOR[1]}@") if in_uri else team.uri
    result = run_cli([*TINY_RUN, "tracking=server", f"tracking.uri={uri}", "tracking.experiment=team",
                      f"paths.output_dir={tmp_path}"])
    assert result.returncode == 2 and says in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "epoch" not in result.stdout.lower()
    assert EDITOR[1] not in result.stdout + result.stderr
    if in_uri:  # refused before Hydra wrote the command line anywhere
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and EDITOR[1] in p.read_text(errors="replace")]


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_4_job_sweep_rides_out_a_restart_of_the_server_and_records_no_secret(team, tmp_path, monkeypatch):
    """Through HTTPS as `editor`, with a cloud secret in the jobs' environment: the server is stopped and
    started again once every job has its run; every job finishes with every epoch, the parent's summary
    is complete, models and configs come back through the server's proxy, no secret is in any record.
    The admin made the experiment and granted the editor EDIT on it: each job's uploaded checkpoints
    stay, since deleting them needs MANAGE, and each job says so."""
    experiment_id = team.api("POST", "experiments/create", json={"name": "team-sweep"})["experiment_id"]
    granted = team.call("POST", "api/3.0/mlflow/users/permissions/grant", ADMIN, json={
        "username": EDITOR[0], "resource_type": "experiment", "resource_id": experiment_id, "permission": "EDIT"})
    assert granted.status_code == 200, granted.text
    secret, token = "s3cr3t-cloud-key-do-not-log", "t0ken-for-another-server-do-not-log"
    # a bearer token beside the user and password: MLflow sends the password (basic auth) and keeps the token
    env = {**os.environ, **team.client_env(EDITOR), "AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_TRACKING_TOKEN": token}
    epochs = 2  # TINY_RUN's: the restart meets the jobs training or waiting to send their last records
    sweep = subprocess.Popen(
        [sys.executable, "train.py", "-m", *TINY_RUN, "tracking.system_metrics=false", "hydra/launcher=parallel", "trainer.seed=1,2,3,4", "tracking=server",
         f"tracking.uri={team.uri}", "tracking.experiment=team-sweep", f"paths.output_dir={tmp_path}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for key, value in team.client_env(ADMIN).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(team.uri)
    deadline = time.time() + 400
    while not (len(children := [r for r in _runs_or_none(client, "team-sweep") if r.data.tags.get("mlflow.parentRunId")]) == 4
               and all("val_auc" in r.data.metrics for r in children)):  # every job started and recording
        assert sweep.poll() is None, sweep.stdout.read()[-3000:]
        assert time.time() < deadline, "the 4 jobs did not all reach their first epoch"
        time.sleep(1)
    team.stop()
    time.sleep(5)
    team.start()
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output[-3000:]

    runs = _runs_or_none(client, "team-sweep")
    [parent] = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    # the parent's summary covers all 4 jobs: its table, the best job marked
    assert parent.data.metrics["n_jobs"] == 4 and parent.data.tags["best_child_run_id"] in {c.info.run_id for c in children}
    table = Path(client.download_artifacts(parent.info.run_id, "summary/sweep_summary.csv", str(tmp_path / "summary")))
    assert len(table.read_text().strip().splitlines()) == 1 + 4
    for child in children:
        for metric in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == list(range(1, epochs + 1))
        # each epoch's state went up through the proxy (epoch 1 into slot_1, epoch 2 into slot_0) and stays;
        # an upload still queued when the job finished (the server was down) was dropped instead
        slots = [item.path for item in client.list_artifacts(child.info.run_id, "checkpoints")]
        assert slots and set(slots) <= {"checkpoints/slot_0", "checkpoints/slot_1"}, slots
    refused = [line for line in output.splitlines() if "stay on the server: deleting artifacts needs MANAGE" in line]
    assert len(refused) == 4, output[-3000:]

    # proxied artifacts: everything comes back over HTTPS, and nothing in it (nor in params, tags, the
    # jobs' logs and output folders) holds a password or the secret
    downloaded = Path(client.download_artifacts(children[0].info.run_id, "", str(tmp_path / "download")))
    with zipfile.ZipFile(downloaded / "model" / "model.keras") as archive:
        assert {"config.json", "model.weights.h5"} <= set(archive.namelist())
    assert f"seed: {children[0].data.params['trainer.seed']}" in (downloaded / "config" / "config.yaml").read_text()
    for other in children[1:]:
        client.download_artifacts(other.info.run_id, "config", str(tmp_path / "download" / other.info.run_id))
    secrets = [secret, token, EDITOR[1], ADMIN[1]]
    records = {f"run {r.info.run_id}": json.dumps([r.data.params, r.data.tags]) for r in runs}
    records.update({f"the sweep's output, line {n}": line for n, line in enumerate(output.splitlines())})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    texts = {**records, **{str(p): p.read_bytes().decode("latin-1") for p in files}}
    assert not {where: s for where, text in texts.items() for s in secrets if s in text}

    # the records are rows of PostgreSQL, users and all
    count = subprocess.run([str(PG_BIN / "psql"), "-h", str(team.pgdata), "-p", str(team.pg_port), "-U", "mlflow", "-d",
                            "mlflow", "-tAc", "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) "
                            "WHERE experiments.name = 'team-sweep'"], capture_output=True, text=True, check=True)
    assert count.stdout.strip() == "5"


def _runs_or_none(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []
