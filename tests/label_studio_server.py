"""A real Label Studio for the review tests, from `make review-tools` (its own virtual environment under
.cache), started as `deberta-rad review server up` starts it: a fresh SQLite data folder per server, the
admin account created at first start with its personal access token, and further accounts
made the way people get them: a reviewer signs up through the organization's invite link, and everyone
creates a personal access token in the web app (the calls its Account & Settings page makes)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import REPO

from deberta_rad.label_studio import annotation_labels
from deberta_rad.net import free_port
from deberta_rad.review_server import INSTALLED, ReviewServerPaths, down, new_personal_token, signed_in, up

LABEL_STUDIO = REPO / INSTALLED


@dataclass
class Account:
    """A user of the server and the personal access token it made for itself."""

    email: str
    password: str
    token: str
    user_id: int


@dataclass
class LabelStudioServer:
    """Where the server listens, its admin (whose token creates projects) and its files."""

    url: str
    admin: Account
    legacy_token: str
    log: Path
    startup_s: float

    @property
    def token(self) -> str:
        return self.admin.token

    @property
    def admin_user_id(self) -> int:
        return self.admin.user_id


@contextmanager
def label_studio_server(tmp_dir: Path) -> Iterator[LabelStudioServer]:
    """`deberta-rad review server up` on a free loopback port with a fresh folder under ``tmp_dir`` (the
    first start migrates the SQLite database: about a minute on 2 busy cores), its admin's token and legacy
    token; `down` at the end."""
    if not LABEL_STUDIO.exists():
        pytest.skip("Label Studio is not installed: run `make review-tools` (make test does)")
    paths = ReviewServerPaths(tmp_dir / "review-server")
    started = time.monotonic()
    running = up(paths, free_port(), command=LABEL_STUDIO)
    try:
        startup_s = time.monotonic() - started
        session = signed_in(running.url, running.admin_email, running.admin_password)
        legacy = session.get(f"{running.url}/api/current-user/token", timeout=30)
        legacy.raise_for_status()
        admin = Account(running.admin_email, running.admin_password, running.token, user_id(running.url, running.token))
        yield LabelStudioServer(running.url, admin, legacy.json()["token"], paths.log, startup_s)
    finally:
        down(paths)


def add_reviewer(server: LabelStudioServer, email: str, password: str = "reviewer-Passw0rd") -> Account:
    """A second account in the admin's organization, as a radiologist gets one: the admin's invite link
    (GET /api/invite), the sign-up form, then a personal access token from the signed-in session."""
    invite = requests.get(f"{server.url}/api/invite", headers=bearer(server.url, server.token), timeout=30)
    invite.raise_for_status()
    session = requests.Session()
    signup = server.url + invite.json()["invite_url"]
    session.get(signup, timeout=30).raise_for_status()
    answer = session.post(signup, data=form(session, email=email, password=password), allow_redirects=False, timeout=30)
    assert answer.status_code == 302, f"sign-up of {email} answered {answer.status_code}"
    return account(server.url, email, password, session)


def account(url: str, email: str, password: str, session: requests.Session) -> Account:
    """The signed-in user's new personal access token (Label Studio allows one unrevoked token per user)
    and id."""
    token = new_personal_token(url, email, session)
    return Account(email, password, token, user_id(url, token))


def user_id(url: str, personal_token: str) -> int:
    """The id of the user a personal access token belongs to."""
    whoami = requests.get(f"{url}/api/current-user/whoami", headers=bearer(url, personal_token), timeout=30)
    whoami.raise_for_status()
    return int(whoami.json()["id"])


def form(session: requests.Session, **fields: str) -> dict[str, str]:
    """Form fields with the CSRF token Django set in the session's cookie."""
    return {**fields, "csrfmiddlewaretoken": session.cookies["csrftoken"]}


def as_admin(server: LabelStudioServer, method: str, path: str, body: dict) -> requests.Response:
    """A raw API call with the admin's token, for what the client does not do (settings, ground truth)."""
    return requests.request(method, server.url + path, json=body, headers=bearer(server.url, server.token), timeout=30)


def bearer(url: str, personal_token: str) -> dict[str, str]:
    """Authorization for a raw call: the access token a personal access token is exchanged for."""
    answer = requests.post(f"{url}/api/token/refresh/", json={"refresh": personal_token}, timeout=30)
    answer.raise_for_status()
    return {"Authorization": f"Bearer {answer.json()['access']}"}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def task_opened(server: LabelStudioServer, reviewer: Account, task_id: int) -> dict:
    """The task as the editor loads it when a reviewer opens it in the data manager (every prediction)."""
    answer = requests.get(f"{server.url}/api/tasks/{task_id}/", headers=bearer(server.url, reviewer.token), timeout=30)
    answer.raise_for_status()
    return answer.json()


def next_task(server: LabelStudioServer, reviewer: Account, project_id: int) -> dict:
    """The task "Label All Tasks" gives the reviewer next (predictions of the project's model version)."""
    answer = requests.get(
        f"{server.url}/api/projects/{project_id}/next/", headers=bearer(server.url, reviewer.token), timeout=30
    )
    answer.raise_for_status()
    return answer.json()


def submit(server: LabelStudioServer, reviewer: Account, task_id: int, corrections: dict[str, str]) -> dict:
    """What the labeling editor POSTs when a reviewer submits: the pre-filled prediction's result with
    region ids and origins ("prediction", or "prediction-changed" where corrected), lead time, start
    time, the prediction it started from."""
    task = task_opened(server, reviewer, task_id)
    (prediction,) = task["predictions"]
    result = []
    for i, item in enumerate(prediction["result"]):
        finding = annotation_labels([item]).popitem()[0]
        changed = finding in corrections
        value = {"choices": [corrections[finding]]} if changed else item["value"]
        origin = "prediction-changed" if changed else "prediction"
        result.append(item | {"id": f"t{task_id}r{i:02d}", "value": value, "origin": origin})
    body = {
        "lead_time": 42.5,
        "result": result,
        "draft_id": 0,
        "parent_prediction": prediction["id"],
        "parent_annotation": None,
        "started_at": now(),
    }
    answer = requests.post(
        f"{server.url}/api/tasks/{task_id}/annotations/",
        params={"project": task["project"]},
        json=body,
        headers=bearer(server.url, reviewer.token),
        timeout=30,
    )
    assert answer.status_code == 201, answer.text[:500]
    return answer.json()


def skip(server: LabelStudioServer, reviewer: Account, task_id: int) -> dict:
    """The editor's Skip: the same body as a submit (with whatever is pre-filled) and was_cancelled."""
    task = task_opened(server, reviewer, task_id)
    (prediction,) = task["predictions"]
    result = [
        item | {"id": f"t{task_id}r{i:02d}", "origin": "prediction"} for i, item in enumerate(prediction["result"])
    ]
    body = {
        "lead_time": 3.0,
        "result": result,
        "draft_id": 0,
        "parent_prediction": prediction["id"],
        "parent_annotation": None,
        "started_at": now(),
        "was_cancelled": True,
    }
    answer = requests.post(
        f"{server.url}/api/tasks/{task_id}/annotations/",
        json=body,
        headers=bearer(server.url, reviewer.token),
        timeout=30,
    )
    assert answer.status_code == 201, answer.text[:500]
    return answer.json()
