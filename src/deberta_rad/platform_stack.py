"""The team platform on one machine: PostgreSQL, and an MLflow server on it with accounts.

`deberta-rad platform up` starts, under `.platform/` and on loopback only:
- PostgreSQL (Debian's `postgresql`): its own data folder, a free port, TCP only, a generated password;
- `mlflow server` with PostgreSQL as its backend store, a proxied artifact store (`--artifacts-destination`:
  clients log to `mlflow-artifacts:` through the server and need no access to the folder), and MLflow's
  basic-auth app, whose users live in a second PostgreSQL database;
- three accounts: MLflow's `admin`, a `promoter` (MANAGE on the registered model: who moves `champion`)
  and a `reader` (the default permission, READ).

Passwords are generated once and kept in `.platform/secrets.env` (mode 600; `.platform/` is git-ignored).
They reach PostgreSQL and MLflow through the environment, never a command line (`ps` shows those). `down`
stops what `up` started, by the PIDs it recorded; `status` says what runs. The data, the artifacts and
the accounts stay for the next `up`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from deberta_rad.local_servers import (
    ServerFolder,
    answers,
    is_running,
    loopback_url,
    read_env_file,
    stop_process,
    why_not_answering,
    write_env_file,
)
from deberta_rad.net import free_port
from deberta_rad.webhooks import find_webhook, install_webhook, webhook_url

PLATFORM_DIR = Path(".platform")
DB_USER = "mlflow"
DATABASES = ("mlflow", "mlflow_auth")  # the tracking and registry store; the basic-auth app's users
ACCOUNTS = ("admin", "promoter", "reader")
# Keys rather than passwords: the web app's session key, the secret MLflow signs webhook deliveries with,
# and the key it encrypts that secret with in PostgreSQL.
KEYS = ("flask_secret_key", "webhook_secret", "webhook_encryption_key")
PROMOTER_PERMISSION = "MANAGE"
START_TIMEOUT_S = 120.0
# Where the webhook tells the label service of a promotion unless told otherwise: `deberta-rad serve`'s default.
DEFAULT_SERVICE_URL = "http://127.0.0.1:3000"
# What runs PostgreSQL when the platform is started as root (CI runs as root; PostgreSQL refuses it):
# Debian's `postgresql` package creates this account.
POSTGRES_ACCOUNT = "postgres"


class PlatformError(RuntimeError):
    """The platform cannot start or stop as asked: a missing component, a folder, a server that failed."""


@dataclass(frozen=True)
class PlatformPaths(ServerFolder):
    """Where the platform keeps its state; everything lives under one folder."""

    @property
    def postgres(self) -> Path:
        """PostgreSQL's folder (its data and log); owned by the account that runs it."""
        return self.root / "postgres"

    @property
    def pgdata(self) -> Path:
        return self.postgres / "data"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def auth_config(self) -> Path:
        return self.root / "basic_auth.ini"

    @property
    def mlflow_log(self) -> Path:
        return self.root / "mlflow.log"


@dataclass(frozen=True)
class PlatformState:
    """What `up` started: PIDs and ports, for `status` and `down`."""

    postgres_pid: int
    postgres_port: int
    mlflow_pid: int
    mlflow_port: int
    webhook_url: str = ""  # where MLflow tells the service that an alias moved

    @property
    def tracking_uri(self) -> str:
        return loopback_url(self.mlflow_port)


# ----------------------------------------------------------------------------------------------
# Secrets and state
# ----------------------------------------------------------------------------------------------


def _new_secret(name: str) -> str:
    if name == "webhook_encryption_key":  # MLflow encrypts webhook secrets in its store with this Fernet key
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode()
    return secrets.token_urlsafe(24)


def _secret_line_name(name: str) -> str:
    return name.upper() if name in KEYS else f"{name.upper()}_PASSWORD"


def load_secrets(paths: PlatformPaths) -> dict[str, str]:
    """The platform's passwords and keys, generated on first use and kept (mode 600) for every later `up`."""
    names = ["postgres", *ACCOUNTS, *KEYS]
    stored = read_env_file(paths.secrets)
    known = {name.lower().removesuffix("_password"): value for name, value in stored.items()}
    missing = [name for name in names if name not in known]
    if missing:
        known |= {name: _new_secret(name) for name in missing}
        write_env_file(paths.secrets, {_secret_line_name(name): known[name] for name in names})
    return known


def read_state(paths: PlatformPaths) -> PlatformState | None:
    if not paths.state.is_file():
        return None
    return PlatformState(**json.loads(paths.state.read_text()))


def _write_state(paths: PlatformPaths, state: PlatformState) -> None:
    paths.state.write_text(json.dumps(state.__dict__, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """PostgreSQL's server programs: on PATH, or where Debian's package puts them (not on PATH)."""
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise PlatformError(
            "PostgreSQL is not installed: `make platform` installs Debian's postgresql package, or run "
            "apt-get install postgresql"
        )
    return Path(found[-1]).parent


def _postgres_command(program: str, *arguments: str) -> list[str]:
    """A PostgreSQL program's command line, run as the postgres account when we are root."""
    command = [str(postgres_bindir() / program), *arguments]
    return ["runuser", "-u", POSTGRES_ACCOUNT, "--", *command] if os.geteuid() == 0 else command


def _run_postgres(program: str, *arguments: str) -> None:
    result = subprocess.run(
        _postgres_command(program, *arguments), capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    if result.returncode != 0:
        raise PlatformError(f"PostgreSQL's {program} failed: {(result.stderr or result.stdout).strip()[-800:]}")


def _give_to_postgres(path: Path) -> None:
    """Hand PostgreSQL's new folder to the account that runs it (only when we are root; initdb creates
    everything inside as that account), and check that the account can reach it."""
    if os.geteuid() != 0:
        return
    for owned in (path, *path.iterdir()):
        shutil.chown(owned, POSTGRES_ACCOUNT, POSTGRES_ACCOUNT)
    _check_postgres_reaches(path)


def _check_postgres_reaches(path: Path) -> None:
    """As root, PostgreSQL runs as its own account, which a repository under a private home folder locks out."""
    if os.geteuid() != 0:
        return
    probe = subprocess.run(["runuser", "-u", POSTGRES_ACCOUNT, "--", "test", "-w", str(path.resolve())])
    if probe.returncode != 0:
        raise PlatformError(
            f"{path}: the {POSTGRES_ACCOUNT} account that runs PostgreSQL cannot write here (a parent folder "
            "is private); put the repository, or the platform folder (--folder), where it can"
        )


def _init_postgres(paths: PlatformPaths, password: str) -> None:
    """Create the database cluster once: superuser `mlflow` with the generated password, TCP on loopback only."""
    paths.postgres.mkdir(parents=True, exist_ok=True)
    password_file = paths.postgres / "initial-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    _give_to_postgres(paths.postgres)
    try:
        _run_postgres(
            "initdb",
            "--pgdata",
            str(paths.pgdata.resolve()),
            "--username",
            DB_USER,
            "--pwfile",
            str(password_file.resolve()),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--no-locale",
        )
    finally:
        password_file.unlink(missing_ok=True)


def _start_postgres(paths: PlatformPaths, port: int) -> int:
    """Start the cluster on a loopback port, without a Unix socket; returns the postmaster's PID."""
    _check_postgres_reaches(paths.postgres)
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    log = paths.postgres / "server.log"
    _run_postgres(
        "pg_ctl", "start", "--pgdata", str(paths.pgdata.resolve()), "--log", str(log.resolve()), "--wait", "-o", options
    )
    return int((paths.pgdata / "postmaster.pid").read_text().split()[0])


def _create_databases(port: int, password: str) -> None:
    """The tracking store's and the auth app's databases, where missing."""
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for name in DATABASES:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------


def _database_uri(port: int, database: str) -> str:
    """A PostgreSQL URI without the password: libpq takes it from PGPASSWORD."""
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{database}"


def _write_auth_config(paths: PlatformPaths, postgres_port: int) -> None:
    """MLflow's basic-auth settings: users in PostgreSQL, READ for everyone unless granted more."""
    paths.auth_config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {_database_uri(postgres_port, 'mlflow_auth')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # A checked password is trusted for a minute: without it every request pays a PBKDF2 hash, and
        # logging a model fetches each run metric's history in a request of its own (hundreds per run).
        "auth_cache_ttl_seconds = 60\n"
    )


def _start_mlflow(paths: PlatformPaths, postgres_port: int, port: int, known: dict[str, str]) -> int:
    """Start `mlflow server` with the auth app, in its own process group; returns its PID once /health answers."""
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    _write_auth_config(paths, postgres_port)
    env = os.environ | {
        "PGPASSWORD": known["postgres"],
        "MLFLOW_AUTH_CONFIG_PATH": str(paths.auth_config.resolve()),
        "MLFLOW_AUTH_ADMIN_PASSWORD": known["admin"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": known["flask_secret_key"],
        # Webhooks to the service on this machine: a loopback address over plain HTTP, and a new webhook
        # seen within seconds (MLflow caches the webhook list for a minute by default).
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_CACHE_TTL": "5",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": known["webhook_encryption_key"],
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        _database_uri(postgres_port, "mlflow"),
        "--artifacts-destination",
        str(paths.artifacts.resolve()),
        "--serve-artifacts",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with paths.mlflow_log.open("ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _wait_for_health(loopback_url(port), server, paths.mlflow_log)
    return server.pid


def _wait_for_health(uri: str, server: subprocess.Popen, log: Path) -> None:
    why = why_not_answering(f"{uri}/health", server, log, START_TIMEOUT_S)
    if why is not None:
        raise PlatformError(f"mlflow server {why}")


@contextlib.contextmanager
def as_user(username: str, password: str) -> Iterator[None]:
    """MLflow's client reads its credentials from these variables; set them for a block only."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = username, password
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _create_accounts(tracking_uri: str, known: dict[str, str], model_name: str) -> None:
    """The promoter and the reader, and the registered model the promoter manages (created empty if the
    pipeline has not registered a version yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    with as_user("admin", known["admin"]):
        users = AuthServiceClient(tracking_uri)
        for account in ("promoter", "reader"):
            try:
                users.get_user(account)
            except MlflowException:
                users.create_user(account, known[account])
        registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        try:
            registry.get_registered_model(model_name)
        except MlflowException:
            registry.create_registered_model(model_name, description="Chest X-ray report labeler (deberta-rad)")
        granted = users.get_user_permission("promoter", "registered_model", model_name)
        if getattr(granted, "permission", None) != PROMOTER_PERMISSION:
            users.grant_user_permission("promoter", "registered_model", model_name, PROMOTER_PERMISSION)


def _point_webhook(tracking_uri: str, known: dict[str, str], service_url: str | None) -> str:
    """As admin, point the service's webhook (alias set) at ``service_url``, or where it already points
    when None (DEFAULT_SERVICE_URL for a new one), with the platform's secret; returns its URL."""
    from mlflow import MlflowClient

    with as_user("admin", known["admin"]):
        existing = find_webhook(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
        if service_url is None and existing is not None:
            url = existing.url
        else:
            url = webhook_url(service_url or DEFAULT_SERVICE_URL)
        install_webhook(url, known["webhook_secret"], tracking_uri=tracking_uri)
    return url


# ----------------------------------------------------------------------------------------------
# up, down, status
# ----------------------------------------------------------------------------------------------


def up(paths: PlatformPaths, model_name: str, service_url: str | None = None) -> PlatformState:
    """Start PostgreSQL and the MLflow server (or find them running), and make sure the accounts exist and
    the webhook points at the service (at ``service_url`` when given)."""
    running = read_state(paths)
    if running is not None and is_running(running.postgres_pid) and is_running(running.mlflow_pid):
        if service_url is not None and running.webhook_url != webhook_url(service_url):
            hook = _point_webhook(running.tracking_uri, load_secrets(paths), service_url)
            running = replace(running, webhook_url=hook)
            _write_state(paths, running)
        return running
    if running is not None:
        down(paths)
    known = load_secrets(paths)
    if not (paths.pgdata / "PG_VERSION").is_file():
        _init_postgres(paths, known["postgres"])
    postgres_port = free_port()
    postgres_pid = _start_postgres(paths, postgres_port)
    mlflow_pid = None
    try:
        _create_databases(postgres_port, known["postgres"])
        mlflow_port = free_port()
        mlflow_pid = _start_mlflow(paths, postgres_port, mlflow_port, known)
        state = PlatformState(postgres_pid, postgres_port, mlflow_pid, mlflow_port)
        _create_accounts(state.tracking_uri, known, model_name)
        state = replace(state, webhook_url=_point_webhook(state.tracking_uri, known, service_url))
    except BaseException:  # half a platform is none: stop what started, so the next `up` starts afresh
        if mlflow_pid is not None:
            stop_process(mlflow_pid, signal.SIGTERM, group=True)
        stop_process(postgres_pid, signal.SIGINT)
        raise
    _write_state(paths, state)
    return state


def down(paths: PlatformPaths) -> list[str]:
    """Stop what `up` started (MLflow first, then PostgreSQL with a fast shutdown); what was stopped."""
    state = read_state(paths)
    if state is None:
        return []
    stopped = []
    if stop_process(state.mlflow_pid, signal.SIGTERM, group=True):
        stopped.append(f"mlflow server (pid {state.mlflow_pid})")
    if stop_process(state.postgres_pid, signal.SIGINT):
        stopped.append(f"PostgreSQL (pid {state.postgres_pid})")
    paths.state.unlink()
    return stopped


def status(paths: PlatformPaths) -> list[str]:
    """One line per component: running or not, its PID and port."""
    state = read_state(paths)
    if state is None:
        return [f"the platform in {paths.root} is not running (deberta-rad platform up starts it)"]
    health = "answers" if answers(f"{state.tracking_uri}/health") else "does not answer"
    return [
        f"PostgreSQL: {'running' if is_running(state.postgres_pid) else 'stopped'} "
        f"(pid {state.postgres_pid}, 127.0.0.1:{state.postgres_port})",
        f"mlflow server: {'running' if is_running(state.mlflow_pid) else 'stopped'} "
        f"(pid {state.mlflow_pid}, {state.tracking_uri}, /health {health})",
        f"webhook: alias moves are sent to {state.webhook_url or 'nowhere'}",
    ]
