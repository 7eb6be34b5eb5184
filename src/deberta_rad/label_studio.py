"""Radiologist review in Label Studio over its REST API: one project whose labeling interface asks for
the 13 findings' statuses, tasks pre-annotated with the student's labels so the reviewer only corrects,
and the JSON export the reviewed labels come back from (README "Radiologist review").

Errors name the server, the API path, the HTTP status and Label Studio's own detail, never report text:
reports are PHI and error messages end up in terminals and CI logs."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

# Plain requests, not label-studio-sdk: for these few REST calls the SDK would pull opencv-python-headless,
# nltk, datamodel-code-generator, jsf and requests-mock into the project and pin pyjwt to 2.13.x.
import requests

from deberta_rad.schema import FINDINGS, STATUSES

TEXT_NAME = "text"
# Choices names are identifiers in Label Studio's config: the finding's name, lower case, with underscores.
FROM_NAMES: dict[str, str] = {finding: finding.lower().replace(" ", "_") for finding in FINDINGS}
FINDING_OF: dict[str, str] = {name: finding for finding, name in FROM_NAMES.items()}
TOKEN_HINT = "check DEBERTA_RAD_LABEL_STUDIO_TOKEN"
PAGE_SIZE = 100
MAX_DETAIL_CHARS = 500
# What `ensure_project` did to the project it returns.
ProjectState = Literal["created", "config restored", "unchanged"]


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a call; the message says where and why."""


def labeling_config() -> str:
    """The labeling interface: the report on top, then one row per finding with its four statuses as
    radio buttons, each required, so a reviewer works down the list and cannot submit a gap."""
    rows = "\n".join(_finding_row(finding) for finding in FINDINGS)
    return (
        "<View>\n"
        '  <Header value="Report"/>\n'
        f'  <Text name="{TEXT_NAME}" value="${TEXT_NAME}"/>\n'
        '  <Header value="Findings: one status each (pre-filled with the model\'s labels where it has them)"/>\n'
        '  <View style="display: flex; flex-direction: column; gap: 2px">\n'
        f"{rows}\n"
        "  </View>\n"
        "</View>"
    )


def _finding_row(finding: str) -> str:
    choices = "".join(f"<Choice value={quoteattr(status)}/>" for status in STATUSES)
    return (
        '    <View style="display: flex; align-items: center; gap: 1em; border-bottom: 1px solid #eee">\n'
        f'      <View style="width: 16em"><Header value={quoteattr(finding)} size="5"/></View>\n'
        f"      <Choices name={quoteattr(FROM_NAMES[finding])} toName={quoteattr(TEXT_NAME)} "
        f'choice="single-radio" showInline="true" required="true" '
        f"requiredMessage={quoteattr(f'Choose a status for {finding}')}>{choices}</Choices>\n"
        "    </View>"
    )


def task_payload(
    report_id: str,
    text: str,
    institution: str | None,
    prediction: dict[str, str] | None,
    model_version: str | None,
    score: float | None = None,
) -> dict:
    """One task to import; with ``prediction`` (finding -> status) the student's labels ride along as a
    Label Studio prediction, which the labeling interface pre-fills."""
    task: dict[str, Any] = {"data": {"text": text, "report_id": report_id, "institution": institution}}
    if prediction is not None:
        entry: dict[str, Any] = {"result": prediction_result(prediction)}
        if model_version is not None:
            entry["model_version"] = model_version
        if score is not None:
            entry["score"] = float(score)
        task["predictions"] = [entry]
    return task


def prediction_result(labels: Mapping[str, str]) -> list[dict]:
    """Result items (one choices item per finding) in the order of FINDINGS; ValueError on an unknown
    finding or status, which would otherwise import silently and pre-fill nothing."""
    unknown = sorted(set(labels) - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; expected some of {list(FINDINGS)}")
    for finding, status in labels.items():
        if status not in STATUSES:
            raise ValueError(f"{finding}: unknown status {status!r}; expected one of {list(STATUSES)}")
    return [
        {
            "from_name": FROM_NAMES[finding],
            "to_name": TEXT_NAME,
            "type": "choices",
            "value": {"choices": [labels[finding]]},
        }
        for finding in FINDINGS
        if finding in labels
    ]


def annotation_labels(result: list[dict]) -> dict[str, str]:
    """finding -> status from an annotation's (or prediction's) result; ValueError naming anything that
    is not one single known status of a known finding, so a changed interface never passes unnoticed."""
    labels: dict[str, str] = {}
    for item in result:
        name = item.get("from_name")
        if name not in FINDING_OF:
            raise ValueError(f"unknown from_name {name!r} in the annotation; expected one of {sorted(FINDING_OF)}")
        choices = (item.get("value") or {}).get("choices")
        if not isinstance(choices, list) or len(choices) != 1:
            raise ValueError(f"{name}: expected exactly one choice, got {choices!r}")
        if choices[0] not in STATUSES:
            raise ValueError(f"{name}: unknown choice value {choices[0]!r}; expected one of {list(STATUSES)}")
        finding = FINDING_OF[name]
        if finding in labels and labels[finding] != choices[0]:
            raise ValueError(f"{name}: two different choices ({labels[finding]!r}, {choices[0]!r})")
        labels[finding] = choices[0]
    return labels


def token_kind(token: str) -> str:
    """Which token this is: "personal" for a personal access token (a JWT refresh token, the default
    since Label Studio 1.17), "legacy" for the older per-user token an organization must enable."""
    parts = token.split(".")
    if len(parts) != 3:
        return "legacy"
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return "legacy"
    return "personal" if isinstance(payload, dict) and payload.get("token_type") == "refresh" else "legacy"


class LabelStudioClient:
    """The few calls review needs. A personal access token is exchanged at /api/token/refresh/ for a
    short-lived access token (5 minutes), renewed once when a call is refused with 401."""

    def __init__(self, url: str, token: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.kind = token_kind(token)
        self._token = token
        self._access: str | None = None
        self._session = requests.Session()

    # -- projects --------------------------------------------------------------------------------------

    def find_project(self, title: str) -> int | None:
        """The oldest project with exactly this title (Label Studio's title filter matches substrings and
        titles are unique only per creator), or None; changes nothing."""
        found = [p for p in self._pages("/api/projects/", {"title": title}, "results") if p.get("title") == title]
        return int(min(p["id"] for p in found)) if found else None

    def ensure_project(self, title: str) -> tuple[int, ProjectState]:
        """(project id, what was done): the oldest project with exactly this title, its labeling interface
        restored when it differs (an edit in the web app is overwritten, so the state says so), or a new
        project."""
        project_id = self.find_project(title)
        if project_id is None:
            body = {"title": title, "label_config": labeling_config(), "description": PROJECT_DESCRIPTION}
            return int(self._json("POST", "/api/projects/", body=body)["id"]), "created"
        current = self._json("GET", f"/api/projects/{project_id}/").get("label_config")
        if (current or "").strip() == labeling_config().strip():
            return project_id, "unchanged"
        self._json("PATCH", f"/api/projects/{project_id}/", body={"label_config": labeling_config()})
        return project_id, "config restored"

    def project(self, project_id: int) -> dict:
        """The project's settings as Label Studio holds them (label_config, model_version, counts)."""
        return self._json("GET", f"/api/projects/{project_id}/")

    # -- tasks -----------------------------------------------------------------------------------------

    def task_report_ids(self, project_id: int) -> set[str]:
        """report_id of every task in the project, page by page, so a push sends no report twice."""
        tasks = self._pages("/api/tasks/", {"project": project_id}, "tasks")
        return {str(t["data"]["report_id"]) for t in tasks if (t.get("data") or {}).get("report_id") is not None}

    def import_tasks(self, project_id: int, tasks: list[dict]) -> int:
        """Import the tasks (with their predictions) and return how many Label Studio created. The
        project's model version is set to the newest imported predictions' version: Label Studio
        pre-fills only predictions of the project's model version."""
        if not tasks:
            return 0
        answer = self._json(
            "POST", f"/api/projects/{project_id}/import", body=tasks, redact=_strings([t.get("data") for t in tasks])
        )
        if "task_count" not in answer:
            raise LabelStudioError(
                f"Label Studio at {self.url}: POST /api/projects/{project_id}/import answered without a task "
                f"count (keys {sorted(answer)}): an asynchronous import, which this client does not follow"
            )
        versions = [p["model_version"] for t in tasks for p in t.get("predictions", []) if p.get("model_version")]
        if versions and self.project(project_id).get("model_version") != versions[-1]:
            self._json("PATCH", f"/api/projects/{project_id}/", body={"model_version": versions[-1]})
        return int(answer["task_count"])

    def export_tasks(self, project_id: int) -> list[dict]:
        """Every task with its annotations: Label Studio's JSON export, all tasks. There a task's
        `predictions` are ids, each annotation carries the prediction it started from (`prediction`,
        `parent_prediction`) and `completed_by` is the user id. Label Studio keeps a copy of every
        export in its data folder (export/)."""
        params = {"exportType": "JSON", "download_all_tasks": "true"}
        answer = self._json("GET", f"/api/projects/{project_id}/export", params=params)
        if not isinstance(answer, list):
            raise LabelStudioError(f"Label Studio at {self.url}: the JSON export of project {project_id} is no list")
        return answer

    # -- transport -------------------------------------------------------------------------------------

    def _pages(self, path: str, params: dict, key: str) -> list[dict]:
        """All items of a page-numbered list (DRF's `next`, or the data manager's `total`)."""
        items: list[dict] = []
        page = 1
        while True:
            answer = self._json("GET", path, params={**params, "page": page, "page_size": PAGE_SIZE})
            batch = answer.get(key) or []
            items.extend(batch)
            total = answer.get("total", answer.get("count"))
            if not batch or len(batch) < PAGE_SIZE or (total is not None and len(items) >= total):
                return items
            page += 1

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        redact: Iterable[str] = (),
    ) -> Any:
        """One call, its JSON answer; LabelStudioError for anything else."""
        response = self._send(method, path, params, body)
        if response.status_code == 401 and self.kind == "personal":
            self._access = None  # the access token expired (5 minutes): renew once
            response = self._send(method, path, params, body)
        if response.status_code >= 400:
            raise LabelStudioError(self._refusal(method, path, response, redact))
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {method} {path} answered {response.status_code} without JSON "
                f"({response.headers.get('Content-Type')}); is {self.url} Label Studio?"
            ) from None

    def _send(self, method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> requests.Response:
        headers = {"Authorization": self._authorization()}
        try:
            return self._session.request(
                method, self.url + path, params=params, json=body, headers=headers, timeout=self.timeout_s
            )
        except requests.RequestException as error:
            raise self._unreachable(method, path, error) from None

    def _authorization(self) -> str:
        if self.kind == "legacy":
            return f"Token {self._token}"
        if self._access is None:
            self._access = self._exchange()
        return f"Bearer {self._access}"

    def _exchange(self) -> str:
        """A personal access token's access token, from /api/token/refresh/."""
        path = "/api/token/refresh/"
        try:
            response = self._session.post(self.url + path, json={"refresh": self._token}, timeout=self.timeout_s)
        except requests.RequestException as error:
            raise self._unreachable("POST", path, error) from None
        if response.status_code >= 400:
            raise LabelStudioError(self._refusal("POST", path, response, ()))
        try:
            return str(response.json()["access"])
        except (ValueError, KeyError, TypeError):
            raise LabelStudioError(
                f"Label Studio at {self.url}: POST {path} answered {response.status_code} without an access token; "
                f"is {self.url} Label Studio 1.17 or later?"
            ) from None

    def _unreachable(self, method: str, path: str, error: requests.RequestException) -> LabelStudioError:
        why = "timed out" if isinstance(error, requests.Timeout) else f"cannot connect ({type(error).__name__})"
        return LabelStudioError(
            f"Label Studio at {self.url}: {method} {path} {why}; is it running there? "
            "(check DEBERTA_RAD_LABEL_STUDIO_URL)"
        )

    def _refusal(self, method: str, path: str, response: requests.Response, redact: Iterable[str]) -> str:
        """Status, Label Studio's detail (report texts of this request cut out) and what to check."""
        status = f"{response.status_code} {response.reason or ''}".strip()
        detail = _scrub(_detail(response), redact)
        hint = _hint(response.status_code, path)
        return (
            f"Label Studio at {self.url}: {method} {path}: {status}"
            + (f" — {detail}" if detail else "")
            + (f" — {hint}" if hint else "")
        )


def _hint(status: int, path: str) -> str | None:
    """What the user can check for this refusal."""
    if status == 401:
        return f"{TOKEN_HINT} (a personal access token from Account & Settings, or a legacy token)"
    if status == 403:
        return f"{TOKEN_HINT}: that account may not do this"
    if status == 404 and path.startswith("/api/token/"):
        return "personal access tokens need Label Studio 1.17 or later"
    if status == 404:
        return "no such project there (deleted, or another server?)"
    return None


PROJECT_DESCRIPTION = (
    "Radiologist review of chest X-ray report labels (deberta-rad review push/pull). "
    "The model's labels are pre-filled: correct them and submit."
)


def _detail(response: requests.Response) -> str:
    """Label Studio's error detail (its JSON `detail` and `validation_errors`), not its traceback. An
    import's validation error quotes the whole task after " :: " (report text included): cut there."""
    try:
        answer = response.json()
    except ValueError:
        return ""
    if not isinstance(answer, dict):
        return ""
    parts = [str(answer["detail"])] if answer.get("detail") else []
    if answer.get("validation_errors"):
        parts.append(json.dumps(_cut_echo(answer["validation_errors"]), ensure_ascii=False, default=str))
    elif not parts:
        parts.append(json.dumps(_cut_echo({k: v for k, v in answer.items() if k != "exc_info"}), default=str))
    return "; ".join(parts)


def _cut_echo(value: Any) -> Any:
    """Every message in Label Studio's nested errors without the task it quotes after " :: "."""
    if isinstance(value, str):
        return value.split(" :: ", 1)[0]
    if isinstance(value, list):
        return [_cut_echo(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut_echo(v) for k, v in value.items()}
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string in ``value``: the tasks' data (report texts, whatever else a caller put there)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _scrub(detail: str, texts: Iterable[str]) -> str:
    """``detail`` without any of ``texts`` or a line of one (longest first), as written raw, in JSON or
    as Python's repr writes it; then shortened."""
    pieces = {piece.strip() for text in texts for piece in (text, *text.splitlines()) if len(piece.strip()) >= 8}
    for piece in sorted(pieces, key=len, reverse=True):
        quoted = [json.dumps(piece, ensure_ascii=ascii_only)[1:-1] for ascii_only in (True, False)]
        echoed = [json.dumps(repr(piece)[1:-1], ensure_ascii=ascii_only)[1:-1] for ascii_only in (True, False)]
        for form in {piece, repr(piece)[1:-1], *quoted, *echoed}:
            detail = detail.replace(form, "<report text>")
    return detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS] + "…"
