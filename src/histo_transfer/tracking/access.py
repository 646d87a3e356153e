"""What a tracking server lets this machine and this user do, asked before anything is recorded: that its
certificate is trusted, that it knows the user, and that the user may write to the experiment. Each
refusal is one line naming what to change (exit 2), never a traceback halfway through a run."""

from __future__ import annotations

import os
import shlex

from mlflow.utils.credentials import get_default_host_creds  # the user, password and certificate MLflow uses
from mlflow.utils.rest_utils import http_request

from histo_transfer.config.errors import ConfigError, UserError
from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import EXPERIMENT_KIND

CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
WRITERS = ("EDIT", "MANAGE")  # the permissions of MLflow's basic-auth app that may create runs


def refuse_credentials_in_uri(uri: str) -> None:
    """A server's user and password belong in the environment: in `tracking.uri` they would sit in Hydra's
    .hydra/ files, the process list and every address MLflow prints."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme in ("http", "https") and "@" in rest.partition("/")[0]:
        raise ConfigError("tracking.uri", f"{redact_uri(uri)} carries a user name or password, which Hydra would "
                          f"write into .hydra/ and the process list would show: set {CREDENTIALS} instead")


def tls_verify() -> bool | str:
    """What MLflow's own client verifies a server's certificate against, for requests made beside it."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def check_server(uri: str, timeout: float = 3.0) -> None:
    """The server answers its /health over a connection this machine trusts."""
    import requests  # MLflow's own HTTP client

    try:
        answered = requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=tls_verify()).status_code == 200
    except requests.exceptions.SSLError as exc:
        reason = str(exc.__context__ or exc).split("(_ssl.c")[0].rsplit("] ", 1)[-1].strip(" '\"(")
        raise ConfigError("tracking.uri", f"the tracking server {redact_uri(uri)} presents a certificate this machine "
                          f"does not trust ({reason}): point MLFLOW_TRACKING_SERVER_CERT_PATH at the server's "
                          "certificate or its CA's") from None
    except requests.RequestException:
        answered = False
    except OSError as exc:  # requests' own check of the certificate file, before any connection
        raise ConfigError("MLFLOW_TRACKING_SERVER_CERT_PATH", f"{tls_verify()}: {exc}") from None
    if not answered:
        raise ConfigError("tracking.uri", f"the tracking server {redact_uri(uri)} does not answer (GET /health): "
                          "start it (scripts/tracking_server.sh), or record into a local store with tracking=local")


def current_user(uri: str) -> dict | None:
    """The user the server's basic-auth app knows us as ({"username", "is_admin"}); None on a server
    without users. Wrong or missing credentials are a ConfigError."""
    response = _call(uri, "/api/2.0/mlflow/users/current", "GET")
    if response.status_code == 404:
        return None
    if response.status_code == 401:
        username = get_default_host_creds(uri).username
        who = f"the user '{username}'" if username else "a request without a user name"
        raise ConfigError("tracking.uri", f"the tracking server {redact_uri(uri)} refused {who} (401, not "
                          f"authenticated): set {CREDENTIALS} to an account it knows")
    _refused(uri, response, "/api/2.0/mlflow/users/current")
    return response.json()["user"]


def _refused(uri: str, response, endpoint: str) -> None:
    """Any other answer than 200, as one line (a 403 before any permission check: the Host header)."""
    if response.status_code == 200:
        return
    hint = (": the server does not accept this address as its Host header; start it with --allowed-hosts naming it"
            if "Host header" in response.text else "")
    raise ConfigError("tracking.uri", f"{redact_uri(uri)} answered {endpoint} with {response.status_code} "
                      f"({response.text.strip()[:200]}){hint}")


def require_write_access(uri: str, user: dict | None, experiment_id: str, experiment: str) -> None:
    """Training records runs: a user who may only read the experiment is stopped before any run exists."""
    if user is None or user["is_admin"]:
        return
    response = _call(uri, "/api/3.0/mlflow/users/permissions/get", "GET",
                     params={"username": user["username"], "resource_type": "experiment", "resource_id": experiment_id})
    _refused(uri, response, "/api/3.0/mlflow/users/permissions/get")
    permission = response.json()["permission"]
    if permission not in WRITERS:
        raise UserError(f"user '{user['username']}' has {permission} on experiment '{experiment}' (id {experiment_id}) "
                        f"of {redact_uri(uri)}, and recording runs needs EDIT: ask an admin to run `python "
                        f"scripts/tracking_users.py --uri {redact_uri(uri)} grant {shlex.join([user['username'], experiment])} EDIT`, "
                        "or record into another experiment (tracking.experiment=...)")


# --- an admin's side: users and grants (scripts/tracking_users.py) ---------------------------------------

# what a grant on one experiment or registered model may give (MLflow 3.17 refuses NO_PERMISSIONS there:
# it is only a server-wide --default-permission; DENY withholds even what the default would give)
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "DENY")


def _call(uri: str, endpoint: str, method: str, **kwargs):
    return http_request(get_default_host_creds(uri), endpoint, method, max_retries=0, timeout=30, **kwargs)


def _admin_call(uri: str, endpoint: str, method: str, **kwargs) -> dict:
    response = _call(uri, endpoint, method, **kwargs)
    if response.status_code in (401, 403):
        raise UserError(f"{redact_uri(uri)} refused {endpoint} ({response.status_code}): set {CREDENTIALS} "
                        "to an admin's account")
    _refused(uri, response, endpoint)
    return response.json() if response.content else {}


def _experiment_id(uri: str, name: str) -> str:
    """The experiment's id, made (by the admin) when nobody has recorded into it yet, so that its users
    can be granted before their first run."""
    found = _call(uri, "/api/2.0/mlflow/experiments/get-by-name", "GET", params={"experiment_name": name})
    if found.status_code == 404:
        return _admin_call(uri, "/api/2.0/mlflow/experiments/create", "POST",
                           json={"name": name, "tags": [{"key": k, "value": v} for k, v in EXPERIMENT_KIND.items()]})["experiment_id"]
    _refused(uri, found, "/api/2.0/mlflow/experiments/get-by-name")
    return found.json()["experiment"]["experiment_id"]


def add_user(uri: str, username: str, password: str) -> None:
    _admin_call(uri, "/api/2.0/mlflow/users/create", "POST", json={"username": username, "password": password})


def grant(uri: str, username: str, resource: str, permission: str, model: bool = False) -> str:
    """Give `username` `permission` on an experiment (by name) or a registered model; returns what now applies."""
    if permission not in PERMISSIONS:
        raise UserError(f"permission must be one of {', '.join(PERMISSIONS)}, not '{permission}'")
    if model:
        kind, resource_id = "registered_model", resource
    else:
        kind, resource_id = "experiment", _experiment_id(uri, resource)
    _admin_call(uri, "/api/3.0/mlflow/users/permissions/grant", "POST",
                json={"username": username, "resource_type": kind, "resource_id": resource_id, "permission": permission})
    now = _admin_call(uri, "/api/3.0/mlflow/users/permissions/get", "GET",
                      params={"username": username, "resource_type": kind, "resource_id": resource_id})
    return now["permission"]
