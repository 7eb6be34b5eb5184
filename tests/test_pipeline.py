"""The whole lifecycle for real: `dvc repro` in a temporary copy of the repo, then the CLI on its outputs.

The copy gets small params (few reports, one short epoch) so the suite stays quick; every stage, DVC,
the Trainer and the embedded MLflow store are the real ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
import yaml
from conftest import RADLABELS, REPO, needs_shared, wait_until
from fake_openai import expected_labels, serve
from label_studio_server import LabelStudioServer, add_reviewer, submit, task_opened
from monitoring_stack import monitoring_stack

from deberta_rad.data import read_label_records, read_reports, write_jsonl
from deberta_rad.label_studio import annotation_labels
from deberta_rad.monitor import read_history, read_json_lines
from deberta_rad.schema import FINDINGS, Report, apply_no_finding_rule
from deberta_rad.synthetic import generate_corpus

BIN = Path(sys.executable).parent
# A user's own reports beside the generator's, so that editing a source can be tried.
OWN_REPORTS = "reports/own.jsonl"
CHAMPION_URI = "models:/deberta-rad@champion"
SMALL_PARAMS = {
    ("ingest", "sources"): ["synthetic", OWN_REPORTS],
    ("ingest", "synthetic", "n_reports"): 150,
    ("pretrain", "epochs"): 1,
    ("pretrain", "max_length"): 64,
    ("augment", "per_report"): 1,  # off by default; on here so the stage and its hand-over are exercised
    ("sentences", "synthetic_reports"): 50,
    ("model", "max_length"): 64,
    ("train", "epochs"): 1,
    ("train", "batch_size"): 16,
    ("train", "logging_steps"): 2,
}


def run(
    args: list[str], cwd: Path, timeout: int = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in the copy with the venv on PATH and no MLflow, LLM or project settings from outside."""
    result = subprocess.run(args, cwd=cwd, env=clean_env(extra_env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def clean_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with the venv on PATH and no MLflow, LLM or project settings from outside."""
    outside = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "OPENAI_BASE_URL", "OPENAI_API_KEY")
    env = {k: v for k, v in os.environ.items() if k not in outside and not k.startswith("DEBERTA_RAD_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | (extra_env or {})


def repo_files() -> list[str]:
    """What a fresh clone holds: tracked files and new files git would not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    return [name for name in listed.stdout.splitlines() if (REPO / name).is_file()]


def set_params(path: Path, values: dict[tuple[str, ...], object]) -> None:
    params = yaml.safe_load(path.read_text())
    for keys, value in values.items():
        section = params
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_of_repo(copy: Path, params: dict[tuple[str, ...], object]) -> Path:
    """A git repository holding what a fresh clone holds, with some params changed and a few reports of
    the user's own (OWN_REPORTS)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for name in repo_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    set_params(copy / "params.yaml", params)
    own = [r for r, _ in generate_corpus(6, seed=2024)]
    write_jsonl(copy / OWN_REPORTS, [r.model_copy(update={"report_id": f"own-{i}"}) for i, r in enumerate(own)])
    run(["git", "init", "-q", "-b", "main"], copy)
    run(["git", "add", "-A"], copy)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"], copy)
    return copy


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = copy_of_repo(tmp_path_factory.mktemp("project"), SMALL_PARAMS)
    run([str(BIN / "dvc"), "repro"], copy, timeout=900)
    return copy


def test_repro_runs_every_stage_and_writes_their_outputs(project: Path) -> None:
    reports = read_reports(project / "data/reports.jsonl")
    assert 0 < len(reports) <= 156  # 150 generated, 6 of the user's own
    assert len(read_label_records(project / "data/pseudo_labels.jsonl")) == len(reports)
    split_sizes = [
        len(read_reports(project / f"data/splits/{name}/reports.jsonl")) for name in ("train", "val", "test")
    ]
    assert sum(split_sizes) == len(reports) and all(split_sizes)
    variants = read_reports(project / "data/augmented/reports.jsonl")
    assert variants and all("~aug" in v.report_id for v in variants)
    assert len(read_label_records(project / "data/augmented/labels.jsonl")) == len(variants)
    sentences = read_reports(project / "data/sentences/train/reports.jsonl")  # model.unit: sentence by default
    sentence_labels = read_label_records(project / "data/sentences/train/labels.jsonl")
    assert sentences and len(sentences) == len(sentence_labels)
    assert all(r.labels["No Finding"] == "not_mentioned" for r in sentence_labels)
    assert json.loads((project / "models/student/config.json").read_text())["unit"] == "sentence"
    pretrained = json.loads((project / "models/pretrained/pretrain.json").read_text())
    assert pretrained["adapted"] and pretrained["n_reports"] == len(reports)  # on by default for MiniLM
    assert (project / "models/pretrained/model.safetensors").is_file()
    assert (project / "models/student/model.safetensors").is_file()
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    for reference in ("teacher", "gold"):
        assert {"macro_f1", "per_finding", "status_f1", "agreement", "kappa"} <= set(metrics[reference])
        assert set(metrics[reference]["per_finding"]) == set(FINDINGS)
    assert metrics["gold"]["source"] == "synthetic"  # the generator's own truth, labelled as such
    assert metrics["teacher"]["source"].startswith("rules/vocabulary-")
    disagreements = metrics["teacher"]["disagreements"]
    assert disagreements["n_cells"] == sum(f["n_cells"] for f in disagreements["by_finding"].values())
    by_phrase = (project / "data/student_vs_teacher.md").read_text()
    assert by_phrase.startswith("# Where the student disagrees with its teacher")
    for finding, counts in disagreements["by_finding"].items():
        assert f"## {finding}: {counts['n_cells']} cells" in by_phrase
    assert {p.name for p in (project / "plots").iterdir()} >= {"confusion_teacher.png", "per_finding_f1_gold.json"}


def test_first_version_is_champion_and_challenger(project: Path) -> None:
    registered = json.loads((project / "metrics/register.json").read_text())
    assert registered["name"] == "deberta-rad" and registered["version"] == 1
    assert set(registered["aliases"]) == {"champion", "challenger"}


def test_second_repro_reruns_only_ingest_which_changes_nothing(project: Path) -> None:
    # The main pipeline only: the relabeling loop (pipelines/relabel) has not run here.
    status = json.loads(run([str(BIN / "dvc"), "status", "dvc.yaml", "--json"], project).stdout)
    assert status == {"ingest": ["always changed"]}  # its sources are params, not deps DVC can list
    again = run([str(BIN / "dvc"), "repro"], project)
    assert "Running stage 'ingest'" in again.stdout and again.stdout.count("Running stage") == 1


def test_editing_a_source_report_or_the_vocabulary_reruns_what_it_feeds(project: Path) -> None:
    dvc = str(BIN / "dvc")
    source, vocabulary = project / OWN_REPORTS, project / "src/deberta_rad/teachers/vocabulary.yaml"
    original_source, original_vocabulary = source.read_text(), vocabulary.read_text()
    try:
        first, *others = read_reports(source)
        write_jsonl(source, [first.model_copy(update={"text": "Edited. " + first.text}), *others])
        run([dvc, "repro", "--single-item", "ingest"], project)
        assert "pseudo_label" in json.loads(run([dvc, "status", "dvc.yaml", "--json"], project).stdout)
        source.write_text(original_source)
        run([dvc, "repro", "--single-item", "ingest"], project)
        vocabulary.write_text(original_vocabulary + "\n# an edit\n")
        assert "pseudo_label" in json.loads(run([dvc, "status", "dvc.yaml", "--json"], project).stdout)
    finally:
        source.write_text(original_source)
        vocabulary.write_text(original_vocabulary)
    assert set(json.loads(run([dvc, "status", "dvc.yaml", "--json"], project).stdout)) == {"ingest"}


def test_a_bad_value_from_dvc_exp_run_fails_in_the_first_stage_that_reads_it(tmp_path: Path) -> None:
    # A fresh copy: DVC removes a stage's outputs before it runs it, so the failed stage leaves none.
    copy = copy_of_repo(tmp_path, {})
    args = [str(BIN / "dvc"), "exp", "run", "-S", "train.alpha=1.5"]
    result = subprocess.run(args, cwd=copy, capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode != 0
    assert "error: params.yaml: train.alpha: Input should be less than or equal to 1, not 1.5" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # ingest reads (and checks) the whole file: the run stops there, before any teacher or training.
    assert "Running stage 'ingest'" in result.stdout and "Running stage 'pseudo_label'" not in result.stdout


def test_dvc_shows_metrics_and_plots(project: Path) -> None:
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], project).stdout)
    assert "metrics/evaluate.json" in json.dumps(shown)
    run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], project)
    assert (project / "dvc_plots" / "index.html").is_file()
    plots = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], project).stdout)
    assert not plots.get("errors")
    confusion = plots["data"]["plots/confusion/teacher/pneumothorax.json"][0]["content"]
    assert {"actual", "predicted"} <= set(confusion["data"]["values"][0])
    assert "plots/confusion_gold.png" in plots["data"]


def test_mlflow_run_has_params_metrics_data_version_and_no_report_text(project: Path) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("deberta-rad", "champion")
    run_data = client.get_run(version.run_id).data
    assert run_data.params["params.alpha"] == "0.5" and "params.temperature" in run_data.params
    assert run_data.params["resolved.max_length"] == "64" and run_data.params["resolved.pretrained"] == "True"
    assert "test.teacher.macro_f1" in run_data.metrics and "eval_macro_f1" in run_data.metrics
    assert all(len(client.get_metric_history(version.run_id, key)) > 1 for key in ("loss", "learning_rate"))
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/evaluate.json", "evaluation/confusion_teacher.png"} <= artifacts
    assert {"data.data/pseudo_labels.jsonl.md5", "data.data/augmented.md5"} <= set(version.tags)
    assert int(run_data.params["n_train_augmented"]) > 0
    corpora = ("data/reports.jsonl", "data/augmented/reports.jsonl")
    texts = {r.text for corpus in corpora for r in read_reports(project / corpus)}
    logged = [*run_data.params.values(), *run_data.tags.values(), *version.tags.values()]
    assert not any(text in value for value in logged for text in texts)


def test_predict_with_the_champion_uri_and_evaluate(project: Path) -> None:
    test_split = project / "data/splits/test"
    run(
        [
            "deberta-rad",
            "predict",
            "--model",
            CHAMPION_URI,
            "--input",
            str(test_split / "reports.jsonl"),
            "--output",
            "predicted.jsonl",
        ],
        project,
    )
    predicted = read_label_records(project / "predicted.jsonl")
    assert [r.report_id for r in predicted] == [r.report_id for r in read_reports(test_split / "reports.jsonl")]
    assert predicted[0].teacher.model == "deberta-rad/1" and predicted[0].probabilities
    scored = run(
        [
            "deberta-rad",
            "evaluate",
            "--predictions",
            "predicted.jsonl",
            "--gold",
            str(test_split / "gold.jsonl"),
            "--json",
            "scored.json",
        ],
        project,
    )
    assert "Macro F1" in scored.stdout
    from_uri = json.loads((project / "scored.json").read_text())
    from_stage = json.loads((project / "metrics/evaluate.json").read_text())["gold"]
    assert from_uri["macro_f1"] == pytest.approx(from_stage["macro_f1"])


def test_changed_knob_reruns_from_train_and_registers_a_challenger(project: Path) -> None:
    """Here the retraining also continues the champion from the registry (train.init_from)."""
    from mlflow import MlflowClient

    set_params(project / "params.yaml", {("train", "alpha"): 0.6, ("train", "init_from"): CHAMPION_URI})
    rerun = run([str(BIN / "dvc"), "repro"], project, timeout=900)  # a retraining: 600 s ran out on a loaded machine
    assert "Running stage 'train'" in rerun.stdout and "Running stage 'split'" not in rerun.stdout
    registered = json.loads((project / "metrics/register.json").read_text())
    assert registered["version"] == 2 and registered["aliases"] == ["challenger"]
    store = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    params = client.get_run(client.get_model_version("deberta-rad", "2").run_id).data.params
    assert params["params.init_from"] == CHAMPION_URI and params["resolved.init_from"] == "deberta-rad/1"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a retraining from the split on, beside Label Studio
def test_reviews_from_label_studio_become_gold_in_test_and_targets_in_training_at_the_next_repro(
    project: Path, label_studio: LabelStudioServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from deberta_rad.label_studio import LabelStudioClient
    from deberta_rad.review import REVIEW_TEACHER, is_gold

    ls_env = {"DEBERTA_RAD_LABEL_STUDIO_URL": label_studio.url, "DEBERTA_RAD_LABEL_STUDIO_TOKEN": label_studio.token}
    # The generated reports, whose truth the reviewer below knows (the user's own carry none).
    truth = {r.report_id: apply_no_finding_rule(r.labels) for r in read_label_records(project / "data/gold.jsonl")}
    pool = [r for r in read_reports(project / "data/reports.jsonl") if r.report_id in truth]
    write_jsonl(project / "data/review/pool.jsonl", pool)
    select = ["review", "select", "--model", "models/student", "--reports", "data/review/pool.jsonl", "--budget", "20"]
    run([str(BIN / "deberta-rad"), *select], project)
    chosen = read_reports(project / "data/review/selected.jsonl")
    assert len(chosen) == 20
    pushed = run([str(BIN / "deberta-rad"), "review", "push"], project, extra_env=ls_env)
    assert "imported 20 tasks" in pushed.stdout
    # Before anyone reviewed them, another selection leaves the pushed reports to the reviewer they wait for.
    again = run([str(BIN / "deberta-rad"), *select, "--output", "data/review/next.jsonl"], project, extra_env=ls_env)
    assert "20 already tasks in Label Studio" in again.stdout
    assert not {r.report_id for r in read_reports(project / "data/review/next.jsonl")} & {r.report_id for r in chosen}

    # A radiologist corrects the student's pre-filled labels to the generator's truth in the web app.
    reviewer = add_reviewer(label_studio, "pipeline.radiologist@example.org")
    admin = LabelStudioClient(label_studio.url, label_studio.token)
    project_id, state = admin.ensure_project("deberta-rad review")
    assert state == "unchanged"
    for task in admin.export_tasks(project_id):
        predicted = annotation_labels(task_opened(label_studio, reviewer, task["id"])["predictions"][0]["result"])
        corrections = {f: s for f, s in truth[task["data"]["report_id"]].items() if predicted[f] != s}
        submit(label_studio, reviewer, task["id"], corrections)
    pulled = run([str(BIN / "deberta-rad"), "review", "pull"], project, extra_env=ls_env)
    assert "appended 20 reviewed reports" in pulled.stdout and "0 refused" in pulled.stdout
    stored = [json.loads(line) for line in (project / "data/reviewed/labels.jsonl").read_text().splitlines()]
    assert {row["report_id"] for row in stored} == {r.report_id for r in chosen}
    assert all(row["labels"] == truth[row["report_id"]] for row in stored)
    assert not any(reviewer.email in json.dumps(row) for row in stored)

    rerun = run([str(BIN / "dvc"), "repro"], project, timeout=900)
    for stage in ("split", "sentences", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in rerun.stdout
    gold = {row["report_id"] for row in stored if is_gold(row["report_id"], 13, 0.3)}
    in_test = read_label_records(project / "data/splits/test/reviewed.jsonl")
    assert gold and gold <= {r.report_id for r in in_test}
    assert all(r.labels == truth[r.report_id] and r.teacher == REVIEW_TEACHER for r in in_test)
    train_reviewed = {r.report_id for r in read_label_records(project / "data/splits/train/reviewed.jsonl")}
    assert train_reviewed and not train_reviewed & gold
    sentence_labels = read_label_records(project / "data/sentences/train/labels.jsonl")
    assert any(r.teacher == REVIEW_TEACHER for r in sentence_labels)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["reviewed"]["source"] == "review/label-studio" and metrics["reviewed"]["macro_f1"] is not None

    store = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    registered = json.loads((project / "metrics/register.json").read_text())
    version = client.get_model_version("deberta-rad", str(registered["version"]))
    assert "eval.reviewed.macro_f1" in version.tags
    train_params = client.get_run(version.run_id).data.params
    val_path = project / "data/splits/val/reviewed.jsonl"
    val_reviewed = read_label_records(val_path) if val_path.is_file() else []
    assert int(train_params["n_reviewed"]) == len(train_reviewed) + len(val_reviewed)
    assert int(train_params["n_reviewed_examples"]) > 0
    # The reviewed gold moved reports into test, so the champion was scored on other test data: promote
    # scores it again on the new split rather than leaving the two versions incomparable.
    champion = client.get_model_version_by_alias("deberta-rad", "champion")
    assert champion.tags["data.data/splits.md5"] != version.tags["data.data/splits.md5"]
    promoted = run([str(BIN / "deberta-rad"), "promote", "--force", "--reason", "the gate's figures vary"], project)
    assert f"champion version {champion.version} was evaluated on other test data: scored again" in promoted.stdout
    assert "Not comparable" not in promoted.stdout
    tags = client.get_model_version("deberta-rad", version.version).tags
    assert tags["promotion.gate"] in ("passed", "forced") and "scored again" in tags["promotion.gate_detail"]
    assert client.get_model_version("deberta-rad", champion.version).tags == champion.tags, "left as registered"
    selection_run, _ = client.search_runs(  # the first selection, then the one beside the waiting tasks
        [client.get_experiment_by_name("deberta-rad").experiment_id],
        "tags.stage = 'review-select'",
        order_by=["attributes.start_time ASC"],
    )
    assert selection_run.data.params["budget"] == "20" and selection_run.data.metrics["selected"] == 20
    logged = json.dumps([selection_run.data.params, selection_run.data.metrics, selection_run.data.tags])
    artifact = client.download_artifacts(selection_run.info.run_id, "review/selection.json", str(tmp_path))
    selection = Path(artifact).read_text()
    assert {row["report_id"] for row in json.loads(selection)["selected"]} == {r.report_id for r in chosen}
    assert not any(r.text in logged or r.text in selection for r in chosen)


def test_llm_teacher_runs_in_the_pipeline_and_a_forced_rerun_is_answered_from_its_cache(tmp_path: Path) -> None:
    copy = copy_of_repo(
        tmp_path,
        {
            ("ingest", "synthetic", "n_reports"): 25,
            ("pseudo_label", "teacher"): "llm",
            ("pseudo_label", "llm_model"): "m",
        },
    )
    with serve() as fake:
        env = {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "sk-pipeline-secret"}
        run([str(BIN / "dvc"), "repro", "pseudo_label"], copy, extra_env=env)
        first = len(fake.requests)
        run([str(BIN / "dvc"), "repro", "--force", "--single-item", "pseudo_label"], copy, extra_env=env)
        assert len(fake.requests) == first
    records = read_label_records(copy / "data/pseudo_labels.jsonl")
    reports = {r.report_id: r.text for r in read_reports(copy / "data/reports.jsonl")}
    assert first == len(records) + 1 == len(reports) + 1  # the structured-output probe, then each report
    assert {(r.teacher.name, r.teacher.model) for r in records} == {("llm", "m")}
    assert all(r.labels == expected_labels(reports[r.report_id]) for r in records)
    tracked = [copy / "dvc.lock", copy / "params.yaml", *(copy / ".dvc").rglob("*")]
    assert not any("sk-pipeline-secret" in p.read_text(errors="ignore") for p in tracked if p.is_file())


REFERENCE_SITE, NEW_SITE = "general", "north"


def label_through_service(url: str, reports: list[Report], batch: int = 50) -> None:
    for start in range(0, len(reports), batch):
        items = [r.model_dump(include={"report_id", "text", "institution"}) for r in reports[start : start + batch]]
        response = requests.post(f"{url}/label", json={"reports": items}, timeout=300)
        assert response.status_code == 200, response.text


def judged(work: Path, institution: str) -> list[dict]:
    """The monitor's judged windows of an institution (its history)."""
    return [w for w in read_history(work / "monitor/history.jsonl") if w["institution"] == institution]


@needs_shared(RADLABELS)
@pytest.mark.timeout(2700)  # two pipeline runs, the relabel loop and the monitoring stack
def test_drift_on_a_new_institution_alerts_through_prometheus_and_alertmanager_and_relabels_and_retrains(
    tmp_path: Path,
) -> None:
    """Train on one institution's style; serve it with capture on, watched by `monitor --follow`,
    Prometheus and Alertmanager with the repo's configs. The reference institution's traffic raises no
    alert; a new institution's (MIMIC-style radlabels reports) raises LabelDrift, which Alertmanager
    delivers to `relabel-on-alert`; the relabel loop (pipelines/relabel) sends that institution's
    least certain reports to the teacher, and `dvc repro` retrains with them."""
    budget, window = 120, 150
    copy = copy_of_repo(
        tmp_path / "project",
        SMALL_PARAMS
        | {
            ("ingest", "synthetic", "n_reports"): 600,  # a test split above monitoring.min_window
            ("ingest", "synthetic", "styles"): ["narrative"],
            # A model that has learnt enough to label the other style differently (with 1-2 epochs at
            # length 64 it answers not_mentioned nearly everywhere, in both styles alike).
            ("model", "max_length"): 128,
            ("train", "epochs"): 3,
            ("pretrain", "enabled"): False,  # nor domain pretraining, which would run again on the rerun
            ("augment", "per_report"): 0,  # the loop is under test here, not augmentation: keep it quick
            ("sentences", "synthetic_reports"): 0,  # generated sentences would show it the other style
            ("sentences", "mention_swaps"): 0,  # as would other phrasings put into its own sentences
            ("relabel", "budget"): budget,
            ("monitoring", "window_reports"): window,
            ("ingest", "sources"): ["synthetic"],  # one institution's style only
        },
    )
    run([str(BIN / "dvc"), "repro"], copy, timeout=1500)
    n_reference = len(read_reports(copy / "data/splits/test/reports.jsonl"))
    min_window = yaml.safe_load((copy / "params.yaml").read_text())["monitoring"]["min_window"]
    assert n_reference >= min_window, f"the reference (test split, {n_reference}) is below min_window {min_window}"
    train_before = {r.report_id for r in read_reports(copy / "data/splits/train/reports.jsonl")}
    # The monitor's reference: the model's answers on its test split (the loop's own first stage).
    run([str(BIN / "dvc"), "repro", "pipelines/relabel/dvc.yaml:predict_reference"], copy)

    general = [
        r.model_copy(update={"report_id": f"{REFERENCE_SITE}-{r.report_id}", "institution": REFERENCE_SITE})
        for r, _ in generate_corpus(3 * window, seed=99, styles=["narrative"])
    ]
    north = [
        r.model_copy(update={"report_id": f"{NEW_SITE}-{r.report_id}", "institution": NEW_SITE})
        for r in read_reports(RADLABELS)[: 2 * window]
    ]
    feed = tmp_path / "feed.jsonl"  # the hospital's own export of every report, texts included
    write_jsonl(feed, general + north)
    work = tmp_path / "monitoring"
    work.mkdir()
    env = clean_env()
    with monitoring_stack(copy, work, copy / "monitoring/loop/reference.jsonl", feed, env) as stack:
        label_through_service(stack.service, general[: 2 * window])
        first_new_request = datetime.now(UTC)
        label_through_service(stack.service, north)
        job = wait_until(
            lambda: [j for j in stack.jobs() if j["institution"] == NEW_SITE and j["state"] != "queued"],
            240,
            "the drift alert reaching relabel-on-alert and its loop starting",
        )[0]
        label_through_service(stack.service, general[2 * window :])  # more of the reference institution
        assert stack.firing("LabelDrift") and {a["institution"] for a in stack.firing("LabelDrift")} == {NEW_SITE}
        delivered = requests.get(f"{stack.alertmanager}/api/v2/alerts", timeout=10).json()
        assert {a["labels"]["institution"] for a in delivered if a["labels"]["alertname"] == "LabelDrift"} == {NEW_SITE}
        done = wait_until(
            lambda: [j for j in stack.jobs() if j["job"] == job["job"] and j["state"] not in ("queued", "running")],
            900,
            "the relabel loop finishing",
        )[0]
        assert done["state"] == "done", (work, done)
        assert done["reports"] == len(north) and len(stack.jobs()) == 1  # once per alert group
        wait_until(
            lambda: len(judged(work, REFERENCE_SITE)) == 3, 120, "the reference institution's third window judged"
        )
        time.sleep(3)  # a few more scrapes and rule evaluations after the reference's last window
        assert stack.query(f'deberta_rad_drift_alarm{{institution="{REFERENCE_SITE}"}}')[0]["value"][1] == "0"
        assert not stack.query(f'count_over_time(ALERTS{{institution="{REFERENCE_SITE}"}}[1h])'), "a false alarm"
        assert not [a for a in stack.team_alerts if a["commonLabels"].get("kind") == "label_drift"]

    false_alarms = sum(w["drift_detected"] for w in judged(work, REFERENCE_SITE))
    job_states = read_json_lines(copy / "monitoring/relabel/jobs.jsonl")
    started = next(datetime.fromisoformat(e["at"]) for e in job_states if e["state"] == "running")
    to_relabel_start = (started - first_new_request).total_seconds()
    print(
        f"first {NEW_SITE} request to relabel loop start: {to_relabel_start:.1f} s; false alarms on "
        f"{REFERENCE_SITE}: {false_alarms} of {len(judged(work, REFERENCE_SITE))} windows"
    )
    assert false_alarms == 0
    assert all(w["drift_detected"] for w in judged(work, NEW_SITE))
    drift = json.loads((copy / "monitoring/loop/drift/drift.json").read_text())
    assert drift["drift_detected"], drift
    assert json.loads((copy / "monitoring/loop/relabel.json").read_text())["labelled"] == budget
    store = [json.loads(line) for line in (copy / "data/relabeled/records.jsonl").read_text().splitlines()]
    assert len({row["report_id"] for row in store}) == budget
    assert {row["report_id"] for row in store} <= {r.report_id for r in north}

    run([str(BIN / "dvc"), "add", "data/relabeled/records.jsonl"], copy)
    set_params(copy / "params.yaml", {("train", "epochs"): 1})  # the retraining is under test, not its quality
    rerun = run([str(BIN / "dvc"), "repro"], copy, timeout=1500)
    assert "Running stage 'ingest'" in rerun.stdout and "Running stage 'train'" in rerun.stdout
    corpus = {r.report_id for r in read_reports(copy / "data/reports.jsonl")}
    assert {row["report_id"] for row in store} <= corpus
    train_after = {r.report_id for r in read_reports(copy / "data/splits/train/reports.jsonl")}
    assert train_before < train_after  # nothing lost, relabeled reports added
    assert json.loads((copy / "metrics/register.json").read_text())["version"] == 2
