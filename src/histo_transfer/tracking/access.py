"""What a tracking server lets this machine and this user do, asked before anything is recorded: that its
certificate is trusted, that it knows the user, and that the user may write to the experiment. Each
refusal is one line naming what to change (exit 2), never a traceback halfway through a run."""

from __future__ import annotations

import os
from urllib.parse import unquote

from mlflow.utils.credentials import get_default_host_creds  # the user, password and certificate MLflow uses
from mlflow.utils.rest_utils import http_request

from histo_transfer.config.errors import ConfigError, UserError
from histo_transfer.tracking.redaction import redact_uri

CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
WRITERS = ("EDIT", "MANAGE")  # the permissions of MLflow's basic-auth app that may create runs


def credentials_out_of_uri(uri: str) -> str:
    """`https://user:pw@host` -> `https://host`, the user and password moved into MLflow's environment
    variables (unless set): MLflow prints and stores the tracking URI in places no redaction reaches."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return uri
    userinfo, host = netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    return f"{scheme}://{host}{slash}{path}"


def tls_verify() -> bool | str:
    """What MLflow's own client verifies a server's certificate against, for requests made beside it."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def check_server(uri: str, timeout: float = 3.0) -> None:
    """The server answers its /health over a connection this machine trusts."""
    import requests  # MLflow's own HTTP client

    try:
        if requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=tls_verify()).status_code == 200:
            return
    except requests.exceptions.SSLError as exc:
        reason = str(exc.__context__ or exc).split("(_ssl.c")[0].rsplit("] ", 1)[-1].strip(" '\"(")
        raise ConfigError("tracking.uri", f"the tracking server {redact_uri(uri)} presents a certificate this machine "
                          f"does not trust ({reason}): point MLFLOW_TRACKING_SERVER_CERT_PATH at the server's "
                          "certificate or its CA's") from None
    except requests.RequestException:
        pass
    raise ConfigError("tracking.uri", f"the tracking server {redact_uri(uri)} does not answer (GET /health): "
                      "start it (scripts/tracking_server.sh), or record into a local store with tracking=local")


def current_user(uri: str) -> dict | None:
    """The user the server's basic-auth app knows us as ({"username", "is_admin"}); None on a server
    without users. Wrong or missing credentials are a ConfigError."""
    creds = get_default_host_creds(uri)
    response = http_request(creds, "/api/2.0/mlflow/users/current", "GET", max_retries=0, timeout=10)
    if response.status_code == 404:
        return None
    if response.status_code == 401:
        who = f"the user '{creds.username}'" if creds.username else "a request without a user name"
        raise ConfigError("tracking.uri", f"the tracking server {redact_uri(uri)} refused {who} (401, not "
                          f"authenticated): set {CREDENTIALS} to an account it knows")
    response.raise_for_status()
    return response.json()["user"]


def require_write_access(uri: str, user: dict | None, experiment_id: str, experiment: str) -> None:
    """Training records runs: a user who may only read the experiment is stopped before any run exists."""
    if user is None or user["is_admin"]:
        return
    response = http_request(get_default_host_creds(uri), "/api/3.0/mlflow/users/permissions/get", "GET",
                            max_retries=0, timeout=10, params={"username": user["username"],
                                                               "resource_type": "experiment",
                                                               "resource_id": experiment_id})
    response.raise_for_status()
    permission = response.json()["permission"]
    if permission not in WRITERS:
        raise UserError(f"user '{user['username']}' has {permission} on experiment '{experiment}' (id {experiment_id}) "
                        f"of {redact_uri(uri)}, and recording runs needs EDIT: ask an admin to run "
                        f"`python scripts/tracking_users.py grant {user['username']} {experiment} EDIT`, "
                        "or record into another experiment (tracking.experiment=...)")


# --- an admin's side: users and grants (scripts/tracking_users.py) ---------------------------------------

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def _admin_call(uri: str, endpoint: str, method: str, **kwargs) -> dict:
    response = http_request(get_default_host_creds(uri), endpoint, method, max_retries=0, timeout=30, **kwargs)
    if response.status_code in (401, 403):
        raise UserError(f"{redact_uri(uri)} refused {endpoint} ({response.status_code}): set {CREDENTIALS} "
                        "to an admin's account")
    if response.status_code != 200:
        message = response.text
        try:
            message = response.json().get("message", message)
        except ValueError:
            pass
        raise UserError(f"{redact_uri(uri)}: {endpoint} failed ({response.status_code}): {message.strip()[:300]}")
    return response.json() if response.content else {}


def add_user(uri: str, username: str, password: str) -> None:
    _admin_call(uri, "/api/2.0/mlflow/users/create", "POST", json={"username": username, "password": password})


def grant(uri: str, username: str, resource: str, permission: str, model: bool = False) -> str:
    """Give `username` `permission` on an experiment (by name) or a registered model; returns what now applies."""
    if permission not in PERMISSIONS:
        raise UserError(f"permission must be one of {', '.join(PERMISSIONS)}, not '{permission}'")
    if model:
        kind, resource_id = "registered_model", resource
    else:
        found = _admin_call(uri, "/api/2.0/mlflow/experiments/get-by-name", "GET", params={"experiment_name": resource})
        kind, resource_id = "experiment", found["experiment"]["experiment_id"]
    _admin_call(uri, "/api/3.0/mlflow/users/permissions/grant", "POST",
                json={"username": username, "resource_type": kind, "resource_id": resource_id, "permission": permission})
    now = _admin_call(uri, "/api/3.0/mlflow/users/permissions/get", "GET",
                      params={"username": username, "resource_type": kind, "resource_id": resource_id})
    return now["permission"]
