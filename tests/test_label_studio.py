"""The Label Studio client against a real Label Studio (`deberta-rad review server up`, `make review-tools`):
the project and its labeling interface, tasks pre-annotated with the student's labels, two reviewers
annotating through the calls the web app makes, the JSON export those labels come back from, and the
errors a user sees. The labeling interface's shape and the result round trip are checked without it."""

from __future__ import annotations

import json
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, free_port
from label_studio_server import (
    LABEL_STUDIO,
    Account,
    LabelStudioServer,
    add_reviewer,
    as_admin,
    next_task,
    skip,
    submit,
    task_opened,
)
from test_pipeline import BIN, clean_env

from deberta_rad.data import AppendOnlyStore, InputError
from deberta_rad.label_studio import (
    FROM_NAMES,
    LabelStudioClient,
    LabelStudioError,
    annotation_labels,
    labeling_config,
    task_payload,
    token_kind,
)
from deberta_rad.local_servers import read_env_file
from deberta_rad.review import pull_reviews, reviewer_pseudonym
from deberta_rad.schema import FINDINGS, STATUSES

NORMAL = {f: "not_mentioned" for f in FINDINGS} | {"No Finding": "present"}
EFFUSION = {f: "not_mentioned" for f in FINDINGS} | {"Pleural Effusion": "present", "Pneumothorax": "absent"}
SECRET = "quokka-marker-9931 right lower lobe"  # report text that must never appear in an error


# -- without a server ------------------------------------------------------------------------------------


def test_labeling_config_has_one_required_single_choice_per_finding_with_the_four_statuses() -> None:
    root = ET.fromstring(labeling_config())
    assert [t.get("name") for t in root.iter("Text")] == ["text"]
    assert next(root.iter("Text")).get("value") == "$text"
    choices = list(root.iter("Choices"))
    assert [c.get("name") for c in choices] == [FROM_NAMES[f] for f in FINDINGS]
    for control in choices:
        assert (control.get("toName"), control.get("choice"), control.get("required")) == (
            "text",
            "single-radio",
            "true",
        )
        assert [c.get("value") for c in control.iter("Choice")] == list(STATUSES)
    headers = [h.get("value") for h in root.iter("Header")]
    assert all(f in headers for f in FINDINGS), "each row shows the finding's own name"


def test_task_payload_carries_the_report_and_the_students_labels_as_a_prediction() -> None:
    task = task_payload("r1", "text", "site-a", EFFUSION, "student-v3", 0.75)
    assert task["data"] == {"text": "text", "report_id": "r1", "institution": "site-a"}
    (prediction,) = task["predictions"]
    assert (prediction["model_version"], prediction["score"]) == ("student-v3", 0.75)
    assert len(prediction["result"]) == len(FINDINGS)
    assert annotation_labels(prediction["result"]) == EFFUSION
    assert "predictions" not in task_payload("r2", "text", None, None, None)
    with pytest.raises(ValueError, match="Pleural Efusion"):
        task_payload("r3", "text", None, {"Pleural Efusion": "present"}, "v")
    with pytest.raises(ValueError, match="'positive'"):
        task_payload("r3", "text", None, {"Edema": "positive"}, "v")


def test_annotation_labels_refuses_what_the_interface_cannot_have_produced() -> None:
    item = {"from_name": "edema", "to_name": "text", "type": "choices", "value": {"choices": ["uncertain"]}}
    assert annotation_labels([item]) == {"Edema": "uncertain"}
    assert annotation_labels([]) == {}
    with pytest.raises(ValueError, match="'oedema'"):
        annotation_labels([item | {"from_name": "oedema"}])
    with pytest.raises(ValueError, match="'maybe'"):
        annotation_labels([item | {"value": {"choices": ["maybe"]}}])
    with pytest.raises(ValueError, match="exactly one"):
        annotation_labels([item | {"value": {"choices": ["present", "absent"]}}])


def test_token_kind_tells_a_personal_access_token_from_a_legacy_one() -> None:
    # header.payload.signature with payload {"token_type":"refresh"} (base64url, unpadded)
    assert token_kind("eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln") == "personal"
    assert token_kind("eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIn0.c2ln") == "legacy"
    assert token_kind("0123456789abcdef0123456789abcdef01234567") == "legacy"
    assert token_kind("not.a.jwt") == "legacy"


# -- against the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(label_studio: LabelStudioServer) -> LabelStudioServer:
    return label_studio


@pytest.fixture(scope="module")
def admin(server: LabelStudioServer) -> LabelStudioClient:
    return LabelStudioClient(server.url, server.token)


@dataclass
class Review:
    project_id: int
    first: Account
    second: Account
    imported: list[int]
    task_ids: dict[str, int]
    annotations: dict[str, int]
    export: dict[str, dict]


@pytest.fixture(scope="module")
def review(server: LabelStudioServer, admin: LabelStudioClient) -> Review:
    """A review round as it happens: a push of student v1's labels; two radiologists annotate r1 (they
    disagree on Cardiomegaly; the admin marks the second as ground truth), the first annotates r2; a push
    of student v2's labels; the second skips r3, nobody opens r4; then the export."""
    project_id, _ = admin.ensure_project("Review round")
    first = add_reviewer(server, "radiologist.one@example.org")
    second = add_reviewer(server, "radiologist.two@example.org")
    imported = [
        admin.import_tasks(
            project_id,
            [
                task_payload("r1", f"Findings: clear lungs. {SECRET}", "site-a", NORMAL, "student-v1", 0.9),
                task_payload(
                    "r2", "Moderate right pleural effusion.\nNo pneumothorax.", "site-a", EFFUSION, "student-v1"
                ),
            ],
        )
    ]
    task_ids = {t["data"]["report_id"]: t["id"] for t in admin.export_tasks(project_id)}
    annotations = {
        "r1 first": submit(server, first, task_ids["r1"], {"Cardiomegaly": "present", "No Finding": "absent"})["id"],
        "r1 second": submit(server, second, task_ids["r1"], {"Cardiomegaly": "uncertain"})["id"],
        "r2 first": submit(server, first, task_ids["r2"], {})["id"],
    }
    ground_truth = f"/api/annotations/{annotations['r1 second']}/"
    as_admin(server, "PATCH", ground_truth, {"ground_truth": True}).raise_for_status()
    imported.append(
        admin.import_tasks(
            project_id,
            [
                task_payload("r3", "Clear lungs.", None, NORMAL, "student-v2", 0.6),
                task_payload("r4", "Stable chest.", "site-b", NORMAL, "student-v2", 0.8),
            ],
        )
    )
    task_ids = {t["data"]["report_id"]: t["id"] for t in admin.export_tasks(project_id)}
    annotations["r3 second"] = skip(server, second, task_ids["r3"])["id"]
    export = {t["data"]["report_id"]: t for t in admin.export_tasks(project_id)}
    return Review(project_id, first, second, imported, task_ids, annotations, export)


@pytest.mark.slow
def test_label_studio_accepts_the_labeling_config(server: LabelStudioServer) -> None:
    answer = as_admin(server, "POST", "/api/projects/validate/", {"label_config": labeling_config()})
    assert answer.status_code == 204, answer.text[:500]


@pytest.mark.slow
def test_ensure_project_creates_then_finds_it_and_restores_a_changed_config(
    server: LabelStudioServer, admin: LabelStudioClient
) -> None:
    project_id, state = admin.ensure_project("Config check")
    assert state == "created"
    assert admin.ensure_project("Config check") == (project_id, "unchanged")
    assert admin.ensure_project("Config check (copy)")[1] == "created", "a title is matched exactly, not as a substring"
    older = labeling_config().replace('<Choice value="uncertain"/>', "")
    as_admin(server, "PATCH", f"/api/projects/{project_id}/", {"label_config": older}).raise_for_status()
    assert admin.project(project_id)["label_config"].strip() == older.strip()
    assert admin.ensure_project("Config check") == (project_id, "config restored")
    assert admin.project(project_id)["label_config"].strip() == labeling_config().strip()


@pytest.mark.slow
def test_imported_tasks_are_listed_by_report_id_across_pages(
    server: LabelStudioServer, admin: LabelStudioClient
) -> None:
    project_id, _ = admin.ensure_project("Many tasks")
    tasks = [task_payload(f"m{i:03d}", f"Report {i}.", None, NORMAL, "student-v1") for i in range(230)]
    assert admin.import_tasks(project_id, tasks) == 230
    assert admin.task_report_ids(project_id) == {f"m{i:03d}" for i in range(230)}
    assert admin.task_report_ids(admin.ensure_project("Empty")[0]) == set()


@pytest.mark.slow
def test_predictions_are_valid_for_label_studio_and_pre_fill_the_editor(
    server: LabelStudioServer, admin: LabelStudioClient, review: Review
) -> None:
    assert review.imported == [2, 2]
    assert admin.task_report_ids(review.project_id) == {"r1", "r2", "r3", "r4"}
    # Label Studio checks imported predictions against the labeling config and only logs what fails.
    assert "Prediction validation failed" not in server.log.read_text(errors="replace")
    r4 = task_opened(server, review.first, review.task_ids["r4"])
    (prediction,) = r4["predictions"]
    assert (prediction["model_version"], prediction["score"]) == ("student-v2", 0.8)
    assert annotation_labels(prediction["result"]) == NORMAL


@pytest.mark.slow
def test_the_label_stream_pre_fills_the_newest_pushs_predictions(
    server: LabelStudioServer, admin: LabelStudioClient
) -> None:
    """ "Label All Tasks" (GET /api/projects/{id}/next/) shows only predictions of the project's model
    version, which import_tasks moves to the newest push's."""
    project_id, _ = admin.ensure_project("Label stream")
    reviewer = add_reviewer(server, "radiologist.stream@example.org")
    admin.import_tasks(project_id, [task_payload("s1", "Clear lungs.", None, NORMAL, "student-v1", 0.7)])
    assert admin.project(project_id)["model_version"] == "student-v1"
    first = next_task(server, reviewer, project_id)
    assert first["data"]["report_id"] == "s1"
    assert [p["model_version"] for p in first["predictions"]] == ["student-v1"]

    admin.import_tasks(project_id, [task_payload("s2", "Small effusion.", None, EFFUSION, "student-v2", 0.8)])
    assert admin.project(project_id)["model_version"] == "student-v2"
    again = next_task(server, reviewer, project_id)
    assert again["data"]["report_id"] == "s1"
    assert again["predictions"] == [], "an earlier push's open task loses its pre-fill in the stream"
    submit(server, reviewer, again["id"], {})
    second = next_task(server, reviewer, project_id)
    assert second["data"]["report_id"] == "s2"
    (prediction,) = second["predictions"]
    assert (prediction["model_version"], annotation_labels(prediction["result"])) == ("student-v2", EFFUSION)


@pytest.mark.slow
def test_the_export_holds_each_reviewers_annotation_with_who_and_what(
    server: LabelStudioServer, review: Review
) -> None:
    assert set(review.export) == {"r1", "r2", "r3", "r4"}, "every task, annotated or not"
    r1 = review.export["r1"]
    assert r1["data"] == {"text": f"Findings: clear lungs. {SECRET}", "report_id": "r1", "institution": "site-a"}
    by_user = {a["completed_by"]: a for a in r1["annotations"]}
    assert set(by_user) == {review.first.user_id, review.second.user_id}
    assert server.admin_user_id not in by_user
    first, second = by_user[review.first.user_id], by_user[review.second.user_id]
    assert annotation_labels(first["result"]) == NORMAL | {"Cardiomegaly": "present", "No Finding": "absent"}
    assert annotation_labels(second["result"]) == NORMAL | {"Cardiomegaly": "uncertain"}
    assert (first["id"], second["id"]) == (review.annotations["r1 first"], review.annotations["r1 second"])
    assert (first["ground_truth"], second["ground_truth"]) == (False, True)
    assert not first["was_cancelled"] and not second["was_cancelled"]
    assert all(isinstance(a["updated_at"], str) and a["updated_at"] for a in (first, second))
    (r2,) = review.export["r2"]["annotations"]
    assert (r2["completed_by"], annotation_labels(r2["result"])) == (review.first.user_id, EFFUSION)
    (r3,) = review.export["r3"]["annotations"]
    assert (r3["completed_by"], r3["was_cancelled"]) == (review.second.user_id, True)
    assert annotation_labels(r3["result"]) == NORMAL, "a skip carries the pre-filled labels: ignore it by was_cancelled"
    assert review.export["r4"]["annotations"] == []
    assert review.export["r3"]["data"]["institution"] is None


@pytest.mark.slow
def test_the_export_shows_the_prediction_each_annotation_started_from(review: Review) -> None:
    r1 = review.export["r1"]
    assert len(r1["predictions"]) == 1 and isinstance(r1["predictions"][0], int), "tasks list prediction ids"
    for annotation in r1["annotations"]:
        assert annotation["parent_prediction"] == r1["predictions"][0]
        assert (annotation["prediction"]["model_version"], annotation["prediction"]["score"]) == ("student-v1", 0.9)
        assert annotation_labels(annotation["prediction"]["result"]) == NORMAL
        origins = {annotation_labels([i]).popitem()[0]: i["origin"] for i in annotation["result"]}
        assert origins["Edema"] == "prediction"
        assert origins["Cardiomegaly"] == "prediction-changed"


@pytest.mark.slow
def test_pull_settles_each_task_checks_it_and_appends_only_what_is_new(
    server: LabelStudioServer, admin: LabelStudioClient, review: Review, tmp_path: Path
) -> None:
    store = tmp_path / "reviewed/labels.jsonl"
    result = pull_reviews(admin, server.url, "Review round", store)
    # r1: the two reviewers disagree and the admin marked the second as ground truth, but it keeps No
    # Finding present beside an uncertain Cardiomegaly; r2: one annotation; r3 skipped, r4 not opened.
    (refused,) = result.refused
    assert refused.startswith(f"task {review.task_ids['r1']} (report 'r1'): No Finding is present beside Cardiomegaly")
    assert (result.appended, result.not_annotated, result.skipped, result.already_stored) == (1, 1, 1, 0)
    (row,) = AppendOnlyStore(store).records()
    assert row["report_id"] == "r2" and row["labels"] == EFFUSION and row["settled_by"] == "single"
    assert row["reviewer"] == reviewer_pseudonym(server.url, review.first.user_id)
    assert review.first.email not in json.dumps(row)
    assert (row["project"], row["task"], row["annotation"]) == (
        review.project_id,
        review.task_ids["r2"],
        review.annotations["r2 first"],
    )
    again = pull_reviews(admin, server.url, "Review round", store)
    assert (again.appended, again.already_stored, len(again.refused)) == (0, 1, 1)
    with pytest.raises(InputError, match="no Label Studio project named 'Review rounds'"):
        pull_reviews(admin, server.url, "Review rounds", store)
    assert admin.find_project("Review rounds") is None, "a pull creates nothing"


@pytest.mark.slow
def test_a_legacy_token_is_refused_until_the_organization_allows_it(server: LabelStudioServer) -> None:
    legacy = LabelStudioClient(server.url, server.legacy_token)
    assert legacy.kind == "legacy"
    with pytest.raises(LabelStudioError) as refused:
        legacy.ensure_project("Legacy")
    message = str(refused.value)
    assert "401" in message and "/api/projects/" in message and server.url in message
    assert "legacy token authentication has been disabled" in message
    assert "DEBERTA_RAD_LABEL_STUDIO_TOKEN" in message
    as_admin(
        server, "POST", "/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}
    ).raise_for_status()
    try:
        project_id, state = legacy.ensure_project("Legacy")
        assert state == "created" and legacy.ensure_project("Legacy") == (project_id, "unchanged")
    finally:
        as_admin(
            server, "POST", "/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False}
        ).raise_for_status()


@pytest.mark.slow
def test_an_expired_access_token_is_renewed_from_the_personal_access_token(
    server: LabelStudioServer, admin: LabelStudioClient
) -> None:
    client = LabelStudioClient(server.url, server.token)
    project_id, _ = client.ensure_project("Renewal")
    client._access = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIn0.expired"  # as after its 5 minutes
    assert client.task_report_ids(project_id) == set()
    assert client._access is not None and "expired" not in client._access


@pytest.mark.slow
@pytest.mark.parametrize(
    ("token", "path"),
    [
        ("0123456789abcdef0123456789abcdef01234567", "GET /api/projects/"),
        ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.forged", "POST /api/token/refresh/"),
    ],
    ids=["unknown legacy token", "forged personal token"],
)
def test_a_bad_token_says_401_and_which_setting_to_check(server: LabelStudioServer, token: str, path: str) -> None:
    with pytest.raises(LabelStudioError) as refused:
        LabelStudioClient(server.url, token).ensure_project("Anything")
    message = str(refused.value)
    assert f"Label Studio at {server.url}: {path}: 401 Unauthorized" in message
    assert "DEBERTA_RAD_LABEL_STUDIO_TOKEN" in message


@pytest.mark.slow
def test_a_missing_project_says_404(server: LabelStudioServer, admin: LabelStudioClient) -> None:
    with pytest.raises(LabelStudioError, match=r"GET /api/projects/987654/export: 404 Not Found"):
        admin.export_tasks(987654)


@pytest.mark.slow
def test_a_refused_import_names_the_problem_but_never_the_report_text(admin: LabelStudioClient) -> None:
    project_id, _ = admin.ensure_project("Refused import")
    mistyped = {"data": {"txt": f"Impression: {SECRET}", "report_id": "x1"}}
    with pytest.raises(LabelStudioError) as refused:
        admin.import_tasks(project_id, [mistyped])
    message = str(refused.value)
    assert "400" in message and '\\"text\\" key is expected in task data' in message
    assert "quokka" not in message and "right lower lobe" not in message


def test_a_closed_port_says_label_studio_is_not_reachable_there() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LabelStudioError) as refused:
        LabelStudioClient(url, "0123456789abcdef0123456789abcdef01234567", timeout_s=5).ensure_project("x")
    message = str(refused.value)
    assert f"Label Studio at {url}: GET /api/projects/ cannot connect" in message
    assert "DEBERTA_RAD_LABEL_STUDIO_URL" in message


# -- `deberta-rad review server` -------------------------------------------------------------------------


def review_server(folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`deberta-rad review server ...` run from the repository (where `make review-tools` installed Label Studio)."""
    command = [str(BIN / "deberta-rad"), "review", "server", *arguments, "--folder", str(folder)]
    return subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_review_server_up_makes_the_admin_and_a_token_keeps_them_and_stops(tmp_path: Path) -> None:
    if not LABEL_STUDIO.exists():
        pytest.skip("Label Studio is not installed: run `make review-tools` (make test does)")
    folder, port = tmp_path / "label-studio", free_port()
    try:
        first = review_server(folder, "up", "--port", str(port))
        assert first.returncode == 0, first.stderr
        assert f"Label Studio started: http://127.0.0.1:{port}" in first.stdout
        secrets = read_env_file(folder / "secrets.env")
        assert stat.S_IMODE((folder / "secrets.env").stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert secrets["ADMIN_PASSWORD"] not in first.stdout + first.stderr
        assert secrets["DEBERTA_RAD_LABEL_STUDIO_URL"] == f"http://127.0.0.1:{port}"
        token = secrets["DEBERTA_RAD_LABEL_STUDIO_TOKEN"]
        assert token_kind(token) == "personal" and token not in first.stdout + first.stderr
        assert LabelStudioClient(f"http://127.0.0.1:{port}", token).ensure_project("Kept")[1] == "created"
        log = (folder / "label-studio.log").read_text(errors="replace")
        assert secrets["ADMIN_PASSWORD"] not in log and token not in log

        again = review_server(folder, "up", "--port", str(port))
        assert again.returncode == 0 and "Label Studio already running" in again.stdout
        assert "/health answers" in review_server(folder, "status").stdout

        other_admin = review_server(folder, "up", "--admin-email", "someone@example.org")
        assert other_admin.returncode == 2
        assert "the admin account is admin@example.org" in other_admin.stderr
        taken = review_server(tmp_path / "second", "up", "--port", str(port))
        assert taken.returncode == 2 and f"port {port} on 127.0.0.1 is taken" in taken.stderr

        assert "stopped Label Studio" in review_server(folder, "down").stdout
        assert "is not running" in review_server(folder, "status").stdout
        assert "was not running" in review_server(folder, "down").stdout

        moved = free_port()  # a restart on another port: the same database, admin and token
        restarted = review_server(folder, "up", "--port", str(moved))
        assert restarted.returncode == 0, restarted.stderr
        assert read_env_file(folder / "secrets.env")["DEBERTA_RAD_LABEL_STUDIO_TOKEN"] == token
        assert LabelStudioClient(f"http://127.0.0.1:{moved}", token).ensure_project("Kept")[1] == "unchanged"
    finally:
        review_server(folder, "down")
