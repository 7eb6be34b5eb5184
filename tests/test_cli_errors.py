"""The command line's error boundary, tried the way a new user would get things wrong: every expected
failure ends in one `error:` line that names the file or key, exit code 2, no traceback, and nothing
left behind (no half-written output, no MLflow store created by a failed lookup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, merged
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.schema import FINDINGS
from deberta_rad.settings import get_settings

REPORT = {"report_id": "r1", "text": "FINDINGS: No pleural effusion."}
LABELS = {"report_id": "r1", "labels": {finding: "not_mentioned" for finding in FINDINGS}}


def params_file(overrides: dict | None = None, without: str | None = None) -> str:
    """The repo's params.yaml with `overrides` merged in and the dotted key `without` left out."""
    values = merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {})
    if without:
        *sections, key = without.split(".")
        section = values
        for name in sections:
            section = section[name]
        del section[key]
    return yaml.safe_dump(values, sort_keys=False)


def sources(*names: str) -> str:
    return params_file({"ingest": {"sources": list(names)}})


# Files a case may use, written into an empty working folder before the command runs.
FILES: dict[str, str | bytes] = {
    "ok.jsonl": json.dumps(REPORT) + "\n",
    "labels.jsonl": json.dumps(LABELS) + "\n",
    "empty.jsonl": "",
    "broken.jsonl": json.dumps(REPORT) + '\n{"report_id": "r2", "text": "cut off\n',
    "array.jsonl": "[1, 2]\n",
    "blank_text.jsonl": json.dumps({"report_id": "r1", "text": "   "}) + "\n",
    "latin1.jsonl": '{"report_id": "r1", "text": "Pleural effusion \xe9"}\n'.encode("latin-1"),
    "wrongcols.csv": "id,body\nr1,No effusion.\n",
    "extra_fields.csv": "report_id,text\nr1,No effusion.,surplus\n",
    "notes.txt": "not a report source\n",
    "bad_yaml.yaml": "ingest: [sources\n",
    "list.yaml": "- ingest\n- train\n",
    "empty.yaml": "",
    "partial.yaml": "ingest:\n  sources:\n    - ok.jsonl\n",
    "misspelt_sources.yaml": params_file({"ingest": {"source": ["ok.jsonl"]}}, without="ingest.sources"),
    "string_sources.yaml": params_file({"ingest": {"sources": "ok.jsonl"}}),
    "missing_source.yaml": sources("missing.jsonl"),
    "empty_source.yaml": sources("empty.jsonl"),
    "broken_source.yaml": sources("broken.jsonl"),
    "latin1_source.yaml": sources("latin1.jsonl"),
    "wrongcols_source.yaml": sources("wrongcols.csv"),
    "extra_fields_source.yaml": sources("extra_fields.csv"),
    "array_source.yaml": sources("array.jsonl"),
    "txt_source.yaml": sources("notes.txt"),
    "no_val.yaml": params_file(without="split.fractions.val"),
    "over_one.yaml": params_file({"split": {"fractions": {"train": 0.8, "val": 0.3, "test": 0.2}}}),
    "word_fraction.yaml": params_file({"split": {"fractions": {"train": "most"}}}),
    "split_ok.yaml": params_file({"split": {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}}),
    "misspelt_train.yaml": params_file({"train": {"learning_rat": 0.001}}, without="train.learning_rate"),
    "word_epochs.yaml": params_file({"train": {"epochs": "three"}}),
    "text_rate.yaml": params_file({"train": {"learning_rate": "1e-4"}}),
    "alpha_over_one.yaml": params_file({"train": {"alpha": 1.5}}),
    "unit_unknown.yaml": params_file({"model": {"unit": "paragraph"}}),
    "bad_window.yaml": params_file({"monitoring": {"window": "fortnightly"}}),
    "negative_swaps.yaml": params_file({"sentences": {"mention_swaps": -1}}),
    "misspelt_monitoring.yaml": params_file({"monitoring": {"windw": "D"}}, without="monitoring.window"),
    "no_teacher.yaml": params_file(without="pseudo_label.teacher"),
    "relabel.yaml": params_file({"ingest": {"relabeled": "relabeled.jsonl"}, "relabel": {"budget": 5}}),
    "model/config.json": "{}",
    "folder/empty/.keep": "",
}

# (case, command line, what the message must name), each run in a folder holding only FILES.
BAD_INPUTS = [
    ("params file missing", "ingest --params nope.yaml", "nope.yaml: no params file"),
    ("params not YAML", "ingest --params bad_yaml.yaml", "bad_yaml.yaml:2: not a valid YAML file"),
    ("params not a mapping", "ingest --params list.yaml", "list.yaml: expected a mapping of sections"),
    ("params empty", "ingest --params empty.yaml", "empty.yaml: expected a mapping of sections"),
    (
        "params partial",
        "ingest --params partial.yaml",
        "missing key 'ingest.relabeled'; missing key 'ingest.synthetic'",
    ),
    (
        "sources misspelt",
        "ingest --params misspelt_sources.yaml",
        "missing key 'ingest.sources'; unknown key 'ingest.source' (did you mean 'sources'?)",
    ),
    ("sources not a list", "ingest --params string_sources.yaml", "ingest.sources: Input should be a valid list"),
    ("source missing", "ingest --params missing_source.yaml", "missing.jsonl: no such file or folder"),
    ("source empty", "ingest --params empty_source.yaml", "empty.jsonl: holds no reports"),
    ("source not JSON", "ingest --params broken_source.yaml", "broken.jsonl:2: not valid JSON"),
    ("source not UTF-8", "ingest --params latin1_source.yaml", "latin1.jsonl:1: not UTF-8 text"),
    ("CSV without a text column", "ingest --params wrongcols_source.yaml", "wrongcols.csv:1: CSV needs a 'text'"),
    ("CSV row too long", "ingest --params extra_fields_source.yaml", "extra_fields.csv:2: more fields than the header"),
    ("JSONL line not an object", "ingest --params array_source.yaml", "array.jsonl:1: expected a JSON object"),
    ("source of unknown kind", "ingest --params txt_source.yaml", "notes.txt: unsupported report source"),
    ("label input missing", "label -i nope.jsonl -o out.jsonl", "nope.jsonl: no such file or folder"),
    ("label input empty", "label -i empty.jsonl -o out.jsonl", "empty.jsonl: holds no reports"),
    ("label report blank", "label -i blank_text.jsonl -o out.jsonl", "blank_text.jsonl:1: report 'r1' has empty text"),
    ("label folder without reports", "label -i folder/empty -o out.jsonl", "folder/empty: folder holds no .txt"),
    ("label teacher unknown", "label -i ok.jsonl -o out.jsonl --teacher gpt", "unknown teacher 'gpt'"),
    ("agreement labels missing", "agreement labels.jsonl nope.jsonl", "nope.jsonl: No such file or directory"),
    ("agreement given reports", "agreement ok.jsonl labels.jsonl", "ok.jsonl:1: labels: Field required"),
    (
        "split fraction missing",
        "split -i ok.jsonl --labels labels.jsonl --params no_val.yaml",
        "missing key 'split.fractions.val'",
    ),
    (
        "split fractions over 1",
        "split -i ok.jsonl --labels labels.jsonl --params over_one.yaml",
        "sum to 1; they sum to 1.3",
    ),
    (
        "split fraction a word",
        "split -i ok.jsonl --labels labels.jsonl --params word_fraction.yaml",
        "split.fractions.train: Input should be a valid number, not 'most'",
    ),
    (
        "split labels missing",
        "split -i ok.jsonl --labels nope.jsonl --params split_ok.yaml",
        "nope.jsonl: No such file",
    ),
    (
        "split reports unlabelled",
        "split -i ok.jsonl --labels empty.jsonl --params split_ok.yaml",
        "have no teacher label",
    ),
    ("train params missing", "train --params nope.yaml", "nope.yaml: no params file"),
    (
        "train key misspelt",
        "train --params misspelt_train.yaml",
        "unknown key 'train.learning_rat' (did you mean 'learning_rate'?)",
    ),
    (
        "train epochs a word",
        "train --params word_epochs.yaml",
        "train.epochs: Input should be a valid number, not 'three'",
    ),
    ("train rate read as text", "train --params text_rate.yaml", "not '1e-4' (YAML reads 1e-4 as text: write 1.0e-4)"),
    (
        "train alpha over 1",
        "train --params alpha_over_one.yaml",
        "train.alpha: Input should be less than or equal to 1",
    ),
    (
        "model unit unknown",
        "sentences --params unit_unknown.yaml",
        "model.unit: Input should be 'sentence' or 'report'",
    ),
    (
        "monitor window not a frequency",
        "monitor --reference labels.jsonl --incoming folder --params bad_window.yaml",
        "monitoring.window: must be a pandas frequency",
    ),
    (
        "train splits missing",
        "train --params split_ok.yaml --splits nowhere",
        "nowhere/train/reports.jsonl: no such file",
    ),
    (
        "sentences swaps negative",
        "sentences --params negative_swaps.yaml",
        "sentences.mention_swaps: Input should be greater than or equal to 0",
    ),
    ("predict without a registry", "predict -i ok.jsonl -o out.jsonl", "no MLflow registry at sqlite:///mlflow.db"),
    ("predict model path wrong", "predict -i ok.jsonl -o out.jsonl --model nowhere", "'nowhere' is neither a model"),
    ("predict input empty", "predict -i empty.jsonl -o out.jsonl --model model", "empty.jsonl: holds no reports"),
    ("evaluate gold missing", "evaluate --predictions labels.jsonl --gold nope.jsonl", "nope.jsonl: no such gold file"),
    ("evaluate gold format", "evaluate --predictions labels.jsonl --gold labels.jsonl --gold-format xml", "'xml'"),
    (
        "drift key misspelt",
        "drift --reference labels.jsonl --current labels.jsonl -o drift --params misspelt_monitoring.yaml",
        "did you mean 'window'?",
    ),
    (
        "drift reference missing",
        "drift --reference nope.jsonl --current labels.jsonl -o drift --params split_ok.yaml",
        "nope.jsonl",
    ),
    ("register metrics missing", "register --model-dir model --metrics nope.json", "nope.json: No such file"),
    ("promote without a registry", "promote --params split_ok.yaml", "no MLflow registry at sqlite:///mlflow.db"),
    ("serve not a model folder", "serve --model folder", "folder is not a DeBERTa-RAD model directory"),
    ("serve off loopback, no key", "serve --model model --host 0.0.0.0", "--host 0.0.0.0 is not loopback"),
    (
        "relabel teacher key missing",
        "relabel --reports ok.jsonl --params no_teacher.yaml",
        "no_teacher.yaml: missing key 'pseudo_label.teacher'",
    ),
    ("relabel reports missing", "relabel --reports nope.jsonl --params relabel.yaml", "nope.jsonl: no such file"),
    (
        "monitor --follow without the capture folder",
        "monitor --follow --reference labels.jsonl --incoming capture --params split_ok.yaml",
        "capture: no such folder",
    ),
    ("relabel-on-alert outside a checkout", "relabel-on-alert --project .", "not a deberta-rad checkout"),
    (
        "split-dir of evaluate-split missing",
        "evaluate-split --model model --split-dir nowhere --params split_ok.yaml",
        "nowhere/reports.jsonl",
    ),
    (
        "review select reports missing",
        "review select --model model --reports nope.jsonl --budget 5 --params split_ok.yaml",
        "nope.jsonl: no such file",
    ),
    ("review push before select", "review push --params split_ok.yaml", "`deberta-rad review select` writes it"),
    (
        "review push of another file",
        "review push --selection ok.jsonl --params split_ok.yaml",
        "ok.jsonl:1: not a line of `deberta-rad review select`",
    ),
    (
        "review pull without a token",
        "review pull --params split_ok.yaml",
        "`deberta-rad review server up` keeps its admin's in .label-studio/secrets.env",
    ),
    ("review server up, Label Studio not installed", "review server up", "run `make review-tools`"),
]
UNREACHABLE = [
    ("predict, MLflow server down", "predict -i ok.jsonl -o out.jsonl"),
    ("promote, MLflow server down", "promote --params split_ok.yaml"),
]


def write_files(folder: Path) -> None:
    for name, content in FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder holding only the case files, with the default embedded MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    get_settings.cache_clear()
    write_files(tmp_path)
    yield tmp_path
    get_settings.cache_clear()


def assert_clear_failure(folder: Path, args: str, named: str) -> None:
    before = files_under(folder)
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}{result.exception!r}"
    assert "Traceback" not in result.output, result.output
    assert result.output.startswith("error: "), result.output
    assert named in result.output, result.output
    assert files_under(folder) == before, f"left behind: {sorted(map(str, files_under(folder) - before))}"


def test_the_table_holds_at_least_30_bad_inputs() -> None:
    assert len(BAD_INPUTS) + len(UNREACHABLE) >= 30


@pytest.mark.parametrize(("args", "named"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_ends_in_one_line_that_names_it(workdir: Path, args: str, named: str) -> None:
    assert_clear_failure(workdir, args, named)


@pytest.mark.parametrize("args", [case[1] for case in UNREACHABLE], ids=[case[0] for case in UNREACHABLE])
def test_an_unreachable_mlflow_server_is_named_at_once(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, args: str
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    get_settings.cache_clear()
    assert_clear_failure(workdir, args, f"MLflow server {uri} does not answer")


def test_an_unreachable_label_studio_is_named_at_once(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DEBERTA_RAD_LABEL_STUDIO_URL", url)
    monkeypatch.setenv("DEBERTA_RAD_LABEL_STUDIO_TOKEN", "0123456789abcdef0123456789abcdef01234567")
    get_settings.cache_clear()
    assert_clear_failure(workdir, "review pull --params split_ok.yaml", f"Label Studio at {url}")


def test_verbose_adds_the_traceback(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["--verbose", "agreement", "labels.jsonl", "nope.jsonl"])
    assert result.exit_code == 2
    assert "Traceback" in result.output and "error: nope.jsonl: No such file or directory" in result.output


def test_a_bug_keeps_its_traceback(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only expected failures are turned into one line; an unexpected exception is not hidden."""

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("deberta_rad.data.read_label_records", broken)
    result = CliRunner().invoke(app, ["agreement", "labels.jsonl", "labels.jsonl"])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)
