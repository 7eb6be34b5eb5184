"""Label Studio for radiologist review on this machine: `deberta-rad review server up|down|status`.

`up` starts Label Studio (`make review-tools` installs it in its own virtual environment, since its
dependencies must not constrain the project's) under `.label-studio/` and on loopback only:
- a SQLite database and Label Studio's media and exports in `data/` there;
- its admin account, created by Label Studio at its first start from the environment (never a command
  line: `ps` shows those), with sign-up only through the admin's invite link;
- a personal access token for that account, made once through the API as Account & Settings makes it.

The admin's generated password and the token are kept in `.label-studio/secrets.env` (mode 600;
`.label-studio/` is git-ignored, it holds report text), the token and the address under the names the
settings read (DEBERTA_RAD_LABEL_STUDIO_TOKEN, DEBERTA_RAD_LABEL_STUDIO_URL). `down` stops what `up`
started; the database, the accounts and the token stay for the next `up`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

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

REVIEW_SERVER_DIR = Path(".label-studio")
INSTALLED = Path(".cache/label-studio/bin/label-studio")  # where `make review-tools` puts it
DEFAULT_PORT = 8080  # the settings' default DEBERTA_RAD_LABEL_STUDIO_URL
DEFAULT_ADMIN_EMAIL = "admin@example.org"
# The first start migrates the SQLite database: about a minute on two busy cores.
START_TIMEOUT_S = 300.0
TOKEN_NAME = "DEBERTA_RAD_LABEL_STUDIO_TOKEN"
URL_NAME = "DEBERTA_RAD_LABEL_STUDIO_URL"


class ReviewServerError(RuntimeError):
    """Label Studio cannot start or stop as asked; the message says what and where."""


@dataclass(frozen=True)
class ReviewServerPaths(ServerFolder):
    """Where `up` keeps Label Studio's data, the secrets, its PID and its log: one folder."""

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "label-studio.log"


@dataclass(frozen=True)
class ReviewServer:
    """A running Label Studio that `up` started or found, and its admin."""

    pid: int
    port: int
    admin_email: str
    admin_password: str
    token: str
    started: bool  # False: `up` found it running

    @property
    def url(self) -> str:
        return loopback_url(self.port)


def label_studio_command() -> Path:
    """`make review-tools`' Label Studio, else one on PATH."""
    if INSTALLED.is_file():
        return INSTALLED.resolve()
    found = shutil.which("label-studio")
    if found is None:
        raise ReviewServerError(
            f"Label Studio is not installed: run `make review-tools` in the repository (it installs {INSTALLED} "
            "there, and `review server up` runs from there), or put a label-studio on PATH"
        )
    return Path(found)


def up(
    paths: ReviewServerPaths, port: int = DEFAULT_PORT, admin_email: str | None = None, command: Path | None = None
) -> ReviewServer:
    """Start Label Studio (``command``, default `label_studio_command()`) on 127.0.0.1:``port``, or find
    the one `up` started running, with its admin account and a personal access token for it."""
    stored = read_env_file(paths.secrets)
    email = stored.get("ADMIN_EMAIL") or admin_email or DEFAULT_ADMIN_EMAIL
    if admin_email and admin_email != email:
        raise ReviewServerError(
            f"{paths.secrets}: the admin account is {email}, made at the first start; --admin-email cannot change it"
        )
    state = _read_state(paths)
    if state is not None and is_running(state["pid"]):
        if not answers(f"{loopback_url(state['port'])}/health"):
            raise ReviewServerError(
                f"Label Studio (pid {state['pid']}) runs but does not answer on port {state['port']}; "
                f"see {paths.log}, or `deberta-rad review server down --folder {paths.root}` and up again"
            )
        return _server(state["pid"], state["port"], stored, started=False)
    command = command or label_studio_command()
    password = stored.get("ADMIN_PASSWORD") or secrets.token_urlsafe(18)
    _check_port_free(port)
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the database holds report text
    # Kept before Label Studio makes the account with it, so a start that fails later does not lose it.
    write_env_file(paths.secrets, stored | {"ADMIN_EMAIL": email, "ADMIN_PASSWORD": password})
    pid = _start(command, paths, port, email, password)
    url = loopback_url(port)
    try:
        token = _working_token(url, email, password, stored.get(TOKEN_NAME))
    except BaseException:  # a server whose token we could not make is of no use to review: stop it
        stop_process(pid, signal.SIGTERM, group=True)
        raise
    kept = stored | {"ADMIN_EMAIL": email, "ADMIN_PASSWORD": password, URL_NAME: url, TOKEN_NAME: token}
    write_env_file(paths.secrets, kept)
    paths.state.write_text(json.dumps({"pid": pid, "port": port}) + "\n")
    return _server(pid, port, kept, started=True)


def down(paths: ReviewServerPaths) -> int | None:
    """Stop the Label Studio `up` started (its process group); its PID, or None if none was running."""
    state = _read_state(paths)
    if state is None:
        return None
    stopped = stop_process(state["pid"], signal.SIGTERM, group=True)
    paths.state.unlink()
    return state["pid"] if stopped else None


def status(paths: ReviewServerPaths) -> str:
    """One line: whether the Label Studio `up` started runs and answers."""
    state = _read_state(paths)
    if state is None or not is_running(state["pid"]):
        return f"Label Studio in {paths.root} is not running (deberta-rad review server up starts it)"
    url = loopback_url(state["port"])
    health = "answers" if answers(f"{url}/health") else "does not answer"
    return f"Label Studio: running (pid {state['pid']}, {url}, /health {health}); secrets in {paths.secrets}"


def _server(pid: int, port: int, stored: dict[str, str], started: bool) -> ReviewServer:
    return ReviewServer(pid, port, stored["ADMIN_EMAIL"], stored["ADMIN_PASSWORD"], stored[TOKEN_NAME], started)


def _read_state(paths: ReviewServerPaths) -> dict[str, int] | None:
    return json.loads(paths.state.read_text()) if paths.state.is_file() else None


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ReviewServerError(
                f"port {port} on 127.0.0.1 is taken (another Label Studio?): choose one with --port, and set "
                f"{URL_NAME} to match"
            ) from None


def _environment(paths: ReviewServerPaths, email: str, password: str) -> dict[str, str]:
    """`label-studio start`'s environment: this data folder only, the admin account, sign-up only through
    an invite link, nothing sent to Sentry or analytics, no version check against PyPI. Label Studio also
    reads unprefixed HOST, PORT, DEBUG, USERNAME, PASSWORD...: the prefixed ones set here win."""
    return os.environ | {
        "LABEL_STUDIO_BASE_DATA_DIR": str(paths.data.resolve()),
        "LABEL_STUDIO_DJANGO_DB": "sqlite",
        "LABEL_STUDIO_HOST": "",
        "LABEL_STUDIO_DEBUG": "false",
        "LABEL_STUDIO_USERNAME": email,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
    }


def _start(command: Path, paths: ReviewServerPaths, port: int, email: str, password: str) -> int:
    """`label-studio start` on loopback in its own process group; its PID once /health answers."""
    paths.data.mkdir(parents=True, exist_ok=True)
    with paths.log.open("ab") as log:
        server = subprocess.Popen(
            [str(command), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            env=_environment(paths, email, password),
            cwd=paths.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    why = why_not_answering(f"{loopback_url(port)}/health", server, paths.log, START_TIMEOUT_S)
    if why is not None:
        stop_process(server.pid, signal.SIGTERM, group=True)
        raise ReviewServerError(f"Label Studio {why}")
    return server.pid


def _working_token(url: str, email: str, password: str, known: str | None) -> str:
    """The admin's personal access token: the one kept from an earlier start while Label Studio still
    takes it, else a new one (POST /api/token/ from a signed-in session, as Account & Settings does)."""
    if known and requests.post(f"{url}/api/token/refresh/", json={"refresh": known}, timeout=30).ok:
        return known
    return new_personal_token(url, email, signed_in(url, email, password))


def new_personal_token(url: str, email: str, session: requests.Session) -> str:
    """A new personal access token for the account ``session`` is signed in as (POST /api/token/, as
    Account & Settings does)."""
    made = session.post(
        f"{url}/api/token/", json={}, headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": url}, timeout=30
    )
    if made.status_code == 409:  # Label Studio allows one unrevoked personal access token per account
        raise ReviewServerError(
            f"{email} has a personal access token that is not the one kept here: revoke it in Label Studio "
            f"(sign in at {url}, Account & Settings) and run up again"
        )
    if made.status_code != 201:
        raise ReviewServerError(f"Label Studio at {url}: POST /api/token/ answered {made.status_code}")
    return str(made.json()["token"])


def signed_in(url: str, email: str, password: str) -> requests.Session:
    """A session signed in through the login form, as a browser is."""
    session = requests.Session()
    session.get(f"{url}/user/login/", timeout=30).raise_for_status()
    form = {"email": email, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]}
    answer = session.post(f"{url}/user/login/", data=form, allow_redirects=False, timeout=30)
    if answer.status_code != 302:  # the form again: the account does not exist or has another password
        raise ReviewServerError(
            f"Label Studio at {url} refused {email}'s sign-in (HTTP {answer.status_code}): for the admin, was its "
            "data folder made by another `up`?"
        )
    return session
