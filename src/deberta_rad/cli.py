"""`deberta-rad`: the command line for every lifecycle step (the DVC stages call the same functions)."""

from __future__ import annotations

import itertools
import json
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import click
import typer
import yaml
from typer.core import TyperGroup

from deberta_rad import data, evaluate
from deberta_rad.comparison import compare_labelers, format_comparison_table
from deberta_rad.metrics import format_metrics_table, format_presence_table
from deberta_rad.params import EvaluateParams, MonitoringParams, ParamsError, PromoteParams, load_params
from deberta_rad.schema import LabelRecord, Report

if TYPE_CHECKING:
    from deberta_rad.label_studio import LabelStudioClient

# Failures a user causes and can fix (bad input, params, paths, servers), by module: a module that was
# never imported raised none of them, so the boundary looks them up only where it is loaded and the
# command line does not pay for importing torch or MLflow to report a missing file.
EXPECTED_ELSEWHERE = {
    "mlflow.exceptions": ("MlflowException",),
    "deberta_rad.model": ("BackboneUnavailableError",),
    "deberta_rad.platform_stack": ("PlatformError",),
    "deberta_rad.review_server": ("ReviewServerError",),
    "deberta_rad.promote": ("PromotionError",),
    "deberta_rad.tracking": ("RegistryUnavailableError",),
    "deberta_rad.teachers.llm": ("LLMTeacherError",),
    "deberta_rad.label_studio": ("LabelStudioError",),
    "deberta_rad.backfill": ("BackfillError",),
}


def expected_failures() -> tuple[type[BaseException], ...]:
    """The exception types the boundary turns into one line: our InputError / ParamsError and every
    ValueError of a bad value, OS errors (missing or unreadable files, refused connections), YAML
    errors, and the loaded modules' own (EXPECTED_ELSEWHERE)."""
    loaded = [
        getattr(sys.modules[module], name)
        for module, names in EXPECTED_ELSEWHERE.items()
        if module in sys.modules
        for name in names
    ]
    return (ValueError, OSError, yaml.YAMLError, *loaded)


def failure_message(err: BaseException) -> str:
    """One line (two for an LLM run's summary) naming what failed and where; never report text."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    summary = getattr(err, "summary", None)
    return f"{message}\n{summary.describe()}" if summary else message


class ErrorBoundary(TyperGroup):
    """Every command runs inside it: an expected failure ends in `error: <what>` naming the file or key,
    and exit code 2; `--verbose` adds the traceback. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except expected_failures() as err:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            typer.secho(f"error: {failure_message(err)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    cls=ErrorBoundary, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
)

InputOption = Annotated[Path, typer.Option("--input", "-i", help="Reports: JSONL, CSV or a folder of .txt reports.")]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Label JSONL to write.")]
ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml with the knobs.")]
ModelOption = Annotated[str, typer.Option("--model", help="Model directory or MLflow URI.")]
WorkersOption = Annotated[
    int,
    typer.Option(
        help="Processes that read (and, for the rule teacher, label) reports; 0: every core this process may use. "
        "The output is the same for any number."
    ),
]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _teacher_stage(stage: Callable[[], dict]) -> dict:
    """Run a stage that sends text to the pipeline's teacher and print the LLM's usage line. Returns the
    stage's summary."""
    summary = stage()
    if summary["usage"]:
        typer.echo(summary["usage"])
    return summary


def _input_reports(path: Path) -> list[Report]:
    """The reports a command was given to label or time: an empty input is a mistake, named."""
    reports = data.read_reports(path)
    if not reports:
        raise data.InputError(f"{path}: holds no reports")
    return reports


def _input_stream(path: Path, workers: int) -> Iterator[Report]:
    """The reports a command was given, streamed on `workers` processes; an empty input is a mistake,
    named now (before a model loads)."""
    reports = data.iter_reports(path, workers)
    first = next(reports, None)
    if first is None:
        raise data.InputError(f"{path}: holds no reports")
    return itertools.chain([first], reports)


def _write_json(path: Path, payload: object) -> None:
    """Write a command's JSON result atomically, so a failure never leaves half a file."""
    data.write_atomically(path, lambda temporary: temporary.write_text(json.dumps(payload, indent=2)))


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress; failures add a traceback.")] = False,
) -> None:
    """Configure logging once; log lines carry ids and counts, never report text."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


webhook_app = typer.Typer(help="MLflow's webhook to the label service (README 'Promotion').", no_args_is_help=True)
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("install")
def webhook_install(
    url: Annotated[str, typer.Option("--url", help="The label service's address, e.g. http://127.0.0.1:3000.")],
    check: Annotated[bool, typer.Option(help="Have MLflow send a test delivery to the service now.")] = False,
) -> None:
    """Register an MLflow webhook (model_version_alias.created) pointing at the service, signed with
    DEBERTA_RAD_SERVE_WEBHOOK_SECRET, so a promotion reaches it at once. Needs MLflow >= 3.3 on a SQL
    store and an account that may manage webhooks."""
    from deberta_rad import webhooks
    from deberta_rad.settings import get_settings
    from deberta_rad.tracking import configure_mlflow, require_registry

    settings = get_settings()
    if settings.serve_webhook_secret is None:
        _fail("set DEBERTA_RAD_SERVE_WEBHOOK_SECRET first: MLflow signs deliveries with it, the service checks them")
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        _fail(
            f"MLFLOW_TRACKING_URI is {settings.mlflow_tracking_uri}: only an MLflow tracking server delivers "
            "webhooks (e.g. `deberta-rad platform up`); on an embedded store the service polls instead"
        )
    require_registry()
    configure_mlflow()
    target = webhooks.webhook_url(url)
    webhook_id, created = webhooks.install_webhook(target, settings.serve_webhook_secret.get_secret_value())
    typer.echo(f"{'created' if created else 'updated'} webhook {webhook_id}: alias moves are sent to {target}")
    if check:
        failure = webhooks.send_test_delivery(webhook_id)
        if failure:
            _fail(f"MLflow's test delivery to {target} failed: {failure}")
        typer.echo("MLflow's test delivery was answered")


@app.command()
def generate(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")],
    n_reports: Annotated[int, typer.Option("--n-reports", "-n")] = 1000,
    seed: int = 7,
) -> None:
    """Write the embedded synthetic corpus (reports.jsonl) and its ground truth (labels.jsonl)."""
    from deberta_rad.synthetic import write_corpus

    reports, labels = write_corpus(output_dir, n_reports, seed)
    typer.echo(f"wrote {n_reports} reports to {reports} and their ground truth to {labels}")


params_app = typer.Typer(help="The knobs in params.yaml.", no_args_is_help=True)
app.add_typer(params_app, name="params")


@params_app.command("check")
def params_check(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate a params file (every key present, known, of its type and within its bounds) and print the
    values the stages will use."""
    loaded = load_params(params)
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False).rstrip())
    typer.echo(f"\n{params}: every key is valid")


review_app = typer.Typer(
    help="Radiologist review in Label Studio: select, push, pull (README 'Radiologist review').", no_args_is_help=True
)
app.add_typer(review_app, name="review")


@review_app.command("select")
def review_select(
    model: Annotated[
        str, typer.Option(help="The student: a model folder or an MLflow URI (models:/deberta-rad@champion).")
    ],
    reports: Annotated[Path, typer.Option(help="The reports to choose from: JSONL, CSV or a folder of .txt reports.")],
    budget: Annotated[int, typer.Option(min=1, help="How many reports to send to review.")],
    teacher_labels: Annotated[
        Path | None,
        typer.Option(
            help="The teacher's labels of the reports, for disagreement [default: data/pseudo_labels.jsonl if there]."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The batch for `review push` (holds report text).")
    ] = Path("data/review/selected.jsonl"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Rank the reports by what a review would teach (student uncertainty, student-teacher disagreement,
    rare findings; params `review`), keep near-duplicate texts apart, skip reports already reviewed or
    already tasks in the Label Studio project (when its token is set), and write the best `budget`; the
    choice (ids and scores) is logged to MLflow."""
    from deberta_rad.predict import predict_reports
    from deberta_rad.review import (
        log_selection,
        open_for_review,
        reviewed_reports,
        select_for_review,
        selection_table,
        write_selection,
    )

    config = load_params(params).review
    pool = data.read_reports(reports)
    if not pool:
        raise data.InputError(f"{reports}: holds no reports")
    waiting = tasks_waiting_in_label_studio(config.project)
    open_pool = [r for r in pool if r.report_id not in (waiting or set())]
    in_label_studio, pool = len(pool) - len(open_pool), open_pool
    if teacher_labels is None and Path("data/pseudo_labels.jsonl").is_file():
        teacher_labels = Path("data/pseudo_labels.jsonl")
    teacher = data.labels_by_id(data.read_label_records(teacher_labels)) if teacher_labels else {}
    store = Path(config.store)
    done = reviewed_reports(store) if store.is_file() else []
    predictions, _ = predict_reports(model, open_for_review(pool, done))
    # The version a URI resolved to (models:/deberta-rad@champion moves): Label Studio's model version.
    version = next((p.teacher.model for p in predictions if p.teacher and p.teacher.model), model)
    selection = select_for_review(pool, predictions, teacher, done, budget, config)
    write_selection(output, selection, version)
    run_id = log_selection(selection, version, reports, budget, config)
    typer.echo(selection_table(selection.chosen))
    typer.echo(
        f"selected {len(selection.chosen)} of {selection.pool} reports into {output} (MLflow run {run_id}); "
        f"{selection.already_reviewed} already reviewed, {selection.near_duplicates_skipped} near-duplicates "
        f"skipped, {selection.without_teacher_label} without a teacher label, "
        + (f"{in_label_studio} already tasks in Label Studio" if waiting is not None else LABEL_STUDIO_NOT_ASKED)
        + ("" if teacher_labels else " (no --teacher-labels: disagreement not scored)")
    )


LABEL_STUDIO_NOT_ASKED = "Label Studio not asked for the tasks it holds (no DEBERTA_RAD_LABEL_STUDIO_TOKEN)"


def tasks_waiting_in_label_studio(title: str) -> set[str] | None:
    """Report ids that are already tasks in the review project, reviewed or still waiting for a
    reviewer, so a second `select` before the first batch is done does not choose them again; None when
    no Label Studio token is set (select also works without one)."""
    from deberta_rad.settings import get_settings

    if get_settings().label_studio_token is None:
        return None
    client, _ = label_studio_client()
    project_id = client.find_project(title)
    return client.task_report_ids(project_id) if project_id is not None else set()


def label_studio_client() -> tuple[LabelStudioClient, str]:
    """A client for the configured Label Studio, or an error saying which setting is missing."""
    from deberta_rad.label_studio import LabelStudioClient
    from deberta_rad.settings import get_settings

    settings = get_settings()
    if settings.label_studio_token is None:
        raise data.InputError(
            "no Label Studio token: set DEBERTA_RAD_LABEL_STUDIO_TOKEN for "
            f"{settings.label_studio_url} (DEBERTA_RAD_LABEL_STUDIO_URL): `deberta-rad review server up` keeps its "
            "admin's in .label-studio/secrets.env; elsewhere, Account & Settings > Personal Access Token"
        )
    url = settings.label_studio_url
    return LabelStudioClient(url, settings.label_studio_token.get_secret_value()), url


@review_app.command("push")
def review_push(
    selection: Annotated[Path, typer.Option(help="`review select`'s output.")] = Path("data/review/selected.jsonl"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Create or update the Label Studio project (params `review.project`) and import the selected
    reports, pre-annotated with the student's labels; reports already there or reviewed are skipped."""
    from deberta_rad.review import push_selection, read_selection

    config = load_params(params).review
    rows = read_selection(selection)
    client, url = label_studio_client()
    typer.echo(push_selection(client, rows, config.project, Path(config.store)).describe(url))


@review_app.command("pull")
def review_pull(params: ParamsOption = Path("params.yaml")) -> None:
    """Export the submitted annotations, settle each task (its one annotation, the one all agree on, or
    the one marked ground truth), check them (13 findings, the No Finding convention) and append the new
    ones to the reviewed-label store (params `review.store`); exit 1 when some were refused."""
    from deberta_rad.review import pull_reviews

    config = load_params(params).review
    client, url = label_studio_client()
    store = Path(config.store)
    result = pull_reviews(client, url, config.project, store)
    for problem in result.refused:
        typer.secho(f"refused {problem}", err=True, fg=typer.colors.YELLOW)
    typer.echo(result.describe(store))
    if result.refused:
        typer.secho(REFUSED_HINT, err=True)
        raise typer.Exit(code=1)


REFUSED_HINT = (
    "a refused task stays out of the store until it is fixed in Label Studio (correct the annotation, or mark "
    "one of those that disagree as ground truth) and pulled again"
)


review_server_app = typer.Typer(
    help="Label Studio on this machine for review: up, down, status (README 'Radiologist review').",
    no_args_is_help=True,
)
review_app.add_typer(review_server_app, name="server")
ReviewServerFolder = Annotated[
    Path, typer.Option("--folder", help="Where Label Studio keeps its database, secrets and log (holds report text).")
]


@review_server_app.command("up")
def review_server_up(
    folder: ReviewServerFolder = Path(".label-studio"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port on 127.0.0.1.")] = 8080,
    admin_email: Annotated[
        str | None, typer.Option(help="The admin account made at the first start [default: admin@example.org].")
    ] = None,
) -> None:
    """Start Label Studio on loopback with a SQLite database, its admin account and a personal access token
    (or find it running); `make review-tools` installs it."""
    from deberta_rad.review_server import TOKEN_NAME, URL_NAME, ReviewServerPaths, up

    paths = ReviewServerPaths(folder)
    server = up(paths, port, admin_email)
    how = "started" if server.started else "already running"
    typer.echo(f"Label Studio {how}: {server.url} (pid {server.pid}; SQLite database and log in {folder})")
    typer.echo(f"sign in as {server.admin_email}; its password and API token are in {paths.secrets}")
    typer.echo(f"export $(grep -E '^({URL_NAME}|{TOKEN_NAME})=' {paths.secrets})   # for review select/push/pull")


@review_server_app.command("down")
def review_server_down(folder: ReviewServerFolder = Path(".label-studio")) -> None:
    """Stop the Label Studio `review server up` started; its database, accounts and token stay."""
    from deberta_rad.review_server import ReviewServerPaths, down

    pid = down(ReviewServerPaths(folder))
    typer.echo(f"stopped Label Studio (pid {pid})" if pid else "Label Studio was not running")


@review_server_app.command("status")
def review_server_status(folder: ReviewServerFolder = Path(".label-studio")) -> None:
    """Whether the Label Studio `review server up` started runs and answers."""
    from deberta_rad.review_server import ReviewServerPaths, status

    typer.echo(status(ReviewServerPaths(folder)))


platform_app = typer.Typer(
    help="The team platform on this machine: PostgreSQL and an MLflow server with accounts (README 'Team setup').",
    no_args_is_help=True,
)
app.add_typer(platform_app, name="platform")
PlatformFolder = Annotated[Path, typer.Option("--folder", help="Where the platform keeps its data and secrets.")]


ServiceUrl = Annotated[
    str | None,
    typer.Option(
        "--service-url",
        help="The label service's address, where MLflow's webhook tells it of promotions "
        "[default: where the webhook points now; http://127.0.0.1:3000 for a new one].",
    ),
]


@platform_app.command("up")
def platform_up(folder: PlatformFolder = Path(".platform"), service_url: ServiceUrl = None) -> None:
    """Start PostgreSQL and an MLflow server on it with basic-auth accounts (or find them running), with a
    webhook that tells the service at --service-url when an alias moves."""
    from deberta_rad.platform_stack import PlatformPaths, up
    from deberta_rad.settings import get_settings

    paths = PlatformPaths(folder)
    state = up(paths, get_settings().registered_model, service_url)
    typer.echo(f"MLflow: {state.tracking_uri} (PostgreSQL store, artifacts proxied to {paths.artifacts})")
    typer.echo(f"accounts admin, promoter (may move champion), reader; passwords and keys in {paths.secrets}")
    typer.echo(f"alias moves are sent to {state.webhook_url}, signed with WEBHOOK_SECRET from that file")
    typer.echo(f"export MLFLOW_TRACKING_URI={state.tracking_uri}")
    typer.echo("export MLFLOW_TRACKING_USERNAME=promoter MLFLOW_TRACKING_PASSWORD=<PROMOTER_PASSWORD from that file>")
    typer.echo("export DEBERTA_RAD_SERVE_WEBHOOK_SECRET=<WEBHOOK_SECRET from that file>   # for deberta-rad serve")


@platform_app.command("down")
def platform_down(folder: PlatformFolder = Path(".platform")) -> None:
    """Stop what `platform up` started; the data, artifacts and accounts stay."""
    from deberta_rad.platform_stack import PlatformPaths, down

    stopped = down(PlatformPaths(folder))
    typer.echo("stopped " + ", ".join(stopped) if stopped else "nothing was running")


@platform_app.command("status")
def platform_status(folder: PlatformFolder = Path(".platform")) -> None:
    """What of the platform runs, with PIDs and ports."""
    from deberta_rad.platform_stack import PlatformPaths, status

    typer.echo("\n".join(status(PlatformPaths(folder))))


@app.command()
def ingest(
    params: ParamsOption = Path("params.yaml"),
    output: OutputOption = Path("data/reports.jsonl"),
    gold_output: Annotated[Path, typer.Option(help="Ground-truth labels that came with the sources.")] = Path(
        "data/gold.jsonl"
    ),
    workers: WorkersOption = 0,
) -> None:
    """Read every source in params `ingest.sources`, normalise, de-duplicate, write one reports file (streamed:
    memory holds one id and one text digest per report)."""
    from deberta_rad.parallel import resolve_workers

    config = load_params(params).ingest
    result = data.ingest_to_files(
        config.sources, config.synthetic, config.relabeled, output, gold_output, resolve_workers(workers)
    )
    for source, count in result.per_source.items():
        typer.echo(f"  {source}: {count} reports")
    typer.echo(f"wrote {result.kept} reports to {output}; dropped {result.duplicates_dropped} exact duplicates")


@app.command()
def label(
    input: InputOption,
    output: OutputOption,
    params: Annotated[
        Path | None,
        typer.Option(
            help="Take the teacher, model, cache and batch setting from this params file's pseudo_label (as dvc "
            "repro does); the options below override them."
        ),
    ] = None,
    teacher: Annotated[str | None, typer.Option(help="rules | keyword | llm  [default: rules]")] = None,
    llm_model: Annotated[str | None, typer.Option(help="Model name for --teacher llm.")] = None,
    cache: Annotated[Path | None, typer.Option(help="LLM answer cache folder.")] = None,
    llm_response_format: Annotated[
        Literal["auto", "json_schema", "json_object", "prompt"] | None,
        typer.Option(
            help="How --teacher llm imposes the answer schema (default: DEBERTA_RAD_LLM_RESPONSE_FORMAT, auto: "
            "probe the endpoint once and keep the result in the cache)."
        ),
    ] = None,
    batch: Annotated[
        bool | None,
        typer.Option(
            "--batch/--no-batch",
            help="With --teacher llm: send the reports through the OpenAI Batch API (half the price, answered "
            "within 24 h); an interrupted run's batch is collected by the next run.  [default: no-batch]",
        ),
    ] = None,
    workers: WorkersOption = 0,
) -> None:
    """Pseudo-label reports with a teacher (the rules and keyword teachers stream, on every core by default)."""
    from deberta_rad.parallel import resolve_workers
    from deberta_rad.teachers import write_labels

    pipeline = load_params(params).pseudo_label if params else None
    teacher = teacher or (pipeline.teacher if pipeline else "rules")
    if batch and teacher != "llm":
        raise typer.BadParameter(f"only the llm teacher labels by batch, not {teacher!r}", param_hint="'--batch'")
    llm_model = llm_model or (pipeline.llm_model if pipeline else None)
    cache = cache or (Path(pipeline.cache) if pipeline and pipeline.cache else None)
    batch = batch if batch is not None else bool(pipeline and pipeline.batch)
    source = data.report_source(input)
    source = data.ReportSource(source.parse, data.nonempty(source.units, f"{input}: holds no reports"))
    count, usage = write_labels(
        output, source, teacher, resolve_workers(workers), llm_model, cache, llm_response_format, batch
    )
    if usage:
        typer.echo(usage)
    typer.echo(f"labelled {count} reports with teacher {teacher!r} into {output}")


@app.command()
def agreement(
    labels_a: Annotated[Path, typer.Argument(help="First teacher's label JSONL (rows of the cross-tab).")],
    labels_b: Annotated[Path, typer.Argument(help="Second teacher's label JSONL (columns).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full agreement report here.")] = None,
) -> None:
    """Where two teachers' labels of the same reports agree and differ, per finding and status."""
    from deberta_rad.teachers.agreement import format_agreement_table, teacher_agreement

    records_a, records_b = data.read_label_records(labels_a), data.read_label_records(labels_b)
    result = teacher_agreement(data.labels_by_id(records_a), data.labels_by_id(records_b))
    typer.echo(format_agreement_table(result, _teacher_name(records_a, labels_a), _teacher_name(records_b, labels_b)))
    if json_out:
        _write_json(json_out, result)


def _teacher_name(records: list[LabelRecord], path: Path) -> str:
    """The teacher named in the first record (e.g. `llm:gpt-4o-mini`), else the file name."""
    info = records[0].teacher if records else None
    if info is None:
        return path.stem
    return f"{info.name}:{info.model}" if info.model else info.name


@app.command()
def split(
    input: InputOption = Path("data/reports.jsonl"),
    labels: Annotated[Path, typer.Option(help="Teacher label JSONL.")] = Path("data/pseudo_labels.jsonl"),
    gold: Annotated[Path | None, typer.Option(help="Ground-truth label JSONL, split alongside.")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")] = Path("data/splits"),
    params: ParamsOption = Path("params.yaml"),
    workers: WorkersOption = 0,
) -> None:
    """Deterministic train/val/test split, grouped by patient (or by identical text). Reviewed reports
    (params `review.store`) go along with their reviewed labels; `review.gold_fraction` of them are
    held in the test split as gold. Streams the reports; the folder is swapped in whole at the end."""
    from deberta_rad.parallel import resolve_workers
    from deberta_rad.review import reviewed_for_split

    config = load_params(params)
    workers = resolve_workers(workers)
    store = Path(config.review.store)
    corpus = data.iter_reports(input, workers) if store.is_file() else []
    reviewed, reviewed_gold, outside = reviewed_for_split(store, corpus, config.review)
    counts = data.write_splits(
        input, labels, gold, output_dir, config.split.seed, config.split.fractions, reviewed, reviewed_gold, workers
    )
    typer.echo("split: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    if outside:
        typer.echo(
            f"{len(outside)} reviewed reports in {config.review.store} are not in {input} (not in ingest.sources), "
            f"e.g. {outside[:3]}"
        )


@app.command()
def augment(
    splits: Annotated[Path, typer.Option(help="Folder written by `split` (train is recombined).")] = Path(
        "data/splits"
    ),
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")] = Path("data/augmented"),
    params: ParamsOption = Path("params.yaml"),
    workers: WorkersOption = 0,
) -> None:
    """Recombine train reports into new ones and label them with the pipeline's teacher (params
    `augment`, teacher from `pseudo_label`); `train --augmented` adds them to the train split."""
    from deberta_rad.augment import augment_splits
    from deberta_rad.parallel import resolve_workers

    summary = _teacher_stage(lambda: augment_splits(splits, output_dir, load_params(params), resolve_workers(workers)))
    typer.echo(
        f"wrote {summary['variants']} teacher-labelled variants of {summary['train_reports']} train reports to "
        f"{output_dir} ({summary['duplicates_left_out']} left out: their text already exists)"
    )


@app.command()
def sentences(
    splits: Annotated[Path, typer.Option(help="Folder written by `split` (train and val are read).")] = Path(
        "data/splits"
    ),
    augmented: Annotated[
        Path | None, typer.Option(help="Folder written by `augment`: its variants' sentences join train's.")
    ] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")] = Path("data/sentences"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Label the distinct sentences of the train and val splits with the pipeline's teacher, for the
    sentence-level student (params `model.unit`; with `report` it writes empty files)."""
    from deberta_rad.sentences import label_sentence_splits

    summary = _teacher_stage(lambda: label_sentence_splits(splits, augmented, output_dir, load_params(params)))
    typer.echo(
        f"wrote {summary['train']} train ({summary['synthetic']} of them from generated reports, "
        f"{summary['swaps']} mention swaps) and "
        f"{summary['val']} val distinct sentences, teacher-labelled, to {output_dir} (model.unit {summary['unit']}); "
        f"{summary['reviewed']} train examples carry reviewed labels"
    )


@app.command()
def pretrain(
    reports: Annotated[Path, typer.Option(help="Report JSONL written by `ingest`: the text to adapt to.")] = Path(
        "data/reports.jsonl"
    ),
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the adapted encoder.")] = Path(
        "models/pretrained"
    ),
    params: ParamsOption = Path("params.yaml"),
    work_dir: Annotated[Path, typer.Option(help="Trainer scratch folder.")] = Path("models/pretrain-work"),
) -> None:
    """Adapt the backbone to report text by masked-language modelling (params.yaml `pretrain`)."""
    from deberta_rad.pretrain import PretrainConfig, pretrain_backbone

    config = PretrainConfig.from_params(load_params(params))
    summary = pretrain_backbone(data.read_reports(reports), config, output, work_dir)
    if summary["adapted"]:
        typer.echo(
            f"adapted {config.backbone} to {summary['n_reports']} reports (MLM loss {summary['mlm_loss']:.3f}, "
            f"max_length {summary['max_length']}); wrote {output}"
        )
    else:
        typer.echo(f"pretraining is off for {config.backbone} (params.yaml pretrain.enabled); wrote {output}")


@app.command()
def train(
    splits: Annotated[Path, typer.Option(help="Folder written by `split`.")] = Path("data/splits"),
    augmented: Annotated[
        Path | None, typer.Option(help="Folder written by `augment`: teacher-labelled variants of the train split.")
    ] = None,
    pretrained: Annotated[
        Path | None, typer.Option(help="Folder written by `pretrain`: the encoder to start from.")
    ] = None,
    sentences: Annotated[
        Path | None, typer.Option(help="Folder written by `sentences`: the examples of a sentence-level student.")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model directory to write.")] = Path("models/student"),
    params: ParamsOption = Path("params.yaml"),
    work_dir: Annotated[Path, typer.Option(help="Trainer checkpoints.")] = Path("models/checkpoints"),
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run of the same params and data from its last checkpoint.")
    ] = True,
) -> None:
    """Distil the teacher labels into the student; logs the run to MLflow."""
    from deberta_rad.train import train_from_splits

    summary = train_from_splits(splits, output, load_params(params), work_dir, resume, augmented, pretrained, sentences)
    typer.echo(f"saved the student to {output}; validation macro F1 {summary['eval_macro_f1']:.4f}")


@app.command()
def tune(
    splits: Annotated[Path, typer.Option(help="Folder written by `split` (train and val are used).")] = Path(
        "data/splits"
    ),
    params: ParamsOption = Path("params.yaml"),
    output: Annotated[Path, typer.Option("--output", "-o", help="Search results JSON to write.")] = Path(
        "metrics/tune.json"
    ),
    work_dir: Annotated[Path | None, typer.Option(help="Parent of the per-trial checkpoint folders.")] = None,
    sentences: Annotated[
        Path | None, typer.Option(help="Folder written by `sentences`: the examples of a sentence-level student.")
    ] = None,
) -> None:
    """Search alpha, T_distill and the learning rate on the val split (params `tune`); logs to MLflow."""
    import optuna

    from deberta_rad.tune import format_trials_table
    from deberta_rad.tune import tune as run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial from us instead

    def progress(record: dict) -> None:
        typer.echo(f"trial {record['trial']}: val macro F1 {record['val_macro_f1']:.4f}")

    result = run_search(splits, load_params(params), work_dir, on_trial=progress, sentences_dir=sentences)
    _write_json(output, result)
    typer.echo(f"\n{format_trials_table(result)}\nwrote {output}")


@app.command()
def predict(
    input: InputOption,
    output: OutputOption,
    model: ModelOption = "models:/deberta-rad@champion",
    batch_size: int = 64,
    workers: WorkersOption = 1,
) -> None:
    """Label reports with a trained student (a model directory or e.g. models:/deberta-rad@champion),
    streamed a chunk at a time. Workers only parse the input, so one is the default: more take cores
    from the model's own threads."""
    from deberta_rad.parallel import resolve_workers
    from deberta_rad.predict import predict_to_file

    count, speed = predict_to_file(model, _input_stream(input, resolve_workers(workers)), output, batch_size)
    typer.echo(f"labelled {count} reports into {output} ({speed:.1f} reports/s)")


@app.command()
def backfill(
    input: Annotated[str, typer.Option("--input", "-i", help="A folder of JSONL/CSV report shards, or their glob.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of Parquet shards, one per input shard.")],
    model: ModelOption = "models:/deberta-rad@champion",
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="Ray cluster: HOST:PORT, ray://HOST:PORT, auto (default; or RAY_ADDRESS), local."),
    ] = None,
    actors: Annotated[int | None, typer.Option(min=1, help="Labeler actors (default: one per GPU).")] = None,
    num_gpus_per_actor: Annotated[
        float | None, typer.Option(min=0, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0).")
    ] = None,
    num_cpus_per_actor: Annotated[float, typer.Option(min=0, help="CPUs per actor.")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="The engine's largest batch (reports per forward).")] = 64,
    rows_per_batch: Annotated[int, typer.Option(min=1, help="Reports per Ray Data batch sent to an actor.")] = 1024,
) -> None:
    """Label a sharded corpus on a Ray cluster (README 'Backfills on Ray'); shards already written are skipped,
    so a killed backfill resumes."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        _fail("deberta-rad backfill needs Ray: pip install 'deberta-rad[ray]'")
    from deberta_rad import backfill as ray_backfill

    result = ray_backfill.backfill(
        input,
        output,
        model,
        address=ray,
        actors=actors,
        gpus_per_actor=num_gpus_per_actor,
        cpus_per_actor=num_cpus_per_actor,
        batch_size=batch_size,
        rows_per_batch=rows_per_batch,
        verbose=logging.getLogger().isEnabledFor(logging.INFO),
    )
    typer.echo(ray_backfill.describe(result, output))


@app.command()
def bench(
    input: InputOption,
    json_output: Annotated[Path, typer.Option("--json", help="Where to write the figures (JSON).")],
    model: ModelOption = "models:/deberta-rad@champion",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each side; the median counts.")] = 1,
    backend: Annotated[str | None, typer.Option(help="torch | onnxruntime (default: the setting).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | int8 (default: the setting).")] = None,
    batch_size: Annotated[int, typer.Option(help="The engine's largest batch.")] = 64,
    peak_tflops: Annotated[
        float | None, typer.Option(help="The device's dense bf16 peak, for the hardware limit (known GPUs: looked up).")
    ] = None,
) -> None:
    """Time a naive Hugging Face loop and the engine on the same reports; write speed-up and agreement."""
    from deberta_rad.bench import format_inference_result, inference_benchmark
    from deberta_rad.registry import resolve_model

    texts = [r.text for r in _input_reports(input)]
    model_dir, model_name = resolve_model(model)
    options = {"backend": backend, "precision": precision, "batch_size": batch_size}
    result = inference_benchmark(Path(model_dir), texts, repeats, options, peak_tflops)
    result = {"model": model_name, "input": str(input), **result}
    _write_json(json_output, result)
    typer.echo(f"{format_inference_result(result)}\nwrote {json_output}")


@app.command(name="bench-train")
def bench_train(
    input: Annotated[Path, typer.Option("--input", "-i", help="A split folder with reports.jsonl and labels.jsonl.")],
    json_output: Annotated[Path, typer.Option("--json", help="Where to write the figures (JSON).")],
    params: ParamsOption = Path("params.yaml"),
    max_length: Annotated[int, typer.Option(help="Sequence length to train at.")] = 256,
    steps: Annotated[int, typer.Option(min=2, help="Optimizer steps per side (the first is not timed).")] = 30,
    work_dir: Annotated[Path, typer.Option(help="Scratch folder for the Trainer.")] = Path(".cache/bench-train"),
) -> None:
    """Train-stage throughput (reports/s) at a sequence length: full-length padding vs the stage's batches."""
    from deberta_rad.bench import format_training_result, training_benchmark

    result = training_benchmark(input, load_params(params), max_length, steps, work_dir)
    _write_json(json_output, {"input": str(input), **result})
    typer.echo(f"{format_training_result(result)}\nwrote {json_output}")


@app.command()
def serve(
    model: ModelOption = "models:/deberta-rad@champion",
    host: Annotated[str, typer.Option(help="Address to bind; off loopback an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    api_key: Annotated[
        str | None, typer.Option(envvar="DEBERTA_RAD_SERVE_API_KEY", help="Callers must send it as X-API-Key.")
    ] = None,
) -> None:
    """Serve the model with BentoML (`POST /label`, `/readyz`, `/metrics`); follows an alias's moves."""
    from deberta_rad.serve import run_server

    code = run_server(model, host, port, api_key)
    raise typer.Exit(code=code)


@app.command()
def bento(model: ModelOption = "models:/deberta-rad@champion") -> None:
    """Build a Bento of the service with the model packed in (then `bentoml serve` or containerize it)."""
    from deberta_rad.serve import build_bento

    tag, version = build_bento(model)
    typer.echo(f"built Bento {tag} serving {version}\n  serve it:        bentoml serve {tag}")
    typer.echo(f"  containerize it: bentoml containerize {tag}   (needs Docker)")


@app.command()
def drift(
    reference: Annotated[Path, typer.Option(help="Label JSONL of the reference window (predictions or teacher).")],
    current: Annotated[Path, typer.Option(help="Label JSONL of the current window.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for drift.json and report.html.")],
    webhook: Annotated[str | None, typer.Option(help="POST the verdict here as JSON when drift is found.")] = None,
    exit_zero: Annotated[bool, typer.Option(help="Exit 0 whatever the verdict (pipelines read drift.json).")] = False,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Compare the status distribution per finding (Evidently). Exit 0 no drift, 1 drift, 2 error,
    3 window too small to judge, 4 drift found but the webhook alert failed."""
    from deberta_rad import monitor
    from deberta_rad.net import post_alert

    settings = load_params(params).monitoring
    result, snapshot = monitor.run_drift(data.read_label_records(reference), data.read_label_records(current), settings)
    written = monitor.write_result(result, snapshot, output)
    typer.echo(monitor.format_result(result))
    typer.echo(f"wrote {written} and {output / 'report.html'}")
    code = monitor.exit_code([result])
    if webhook and result["drift_detected"]:
        failure = post_alert(webhook, monitor.alert_payload(result, current=str(current)))
        if failure:
            typer.secho(f"alert not delivered: {failure}", fg=typer.colors.RED, err=True)
            code = monitor.EXIT_ALERT_FAILED
    raise typer.Exit(code=0 if exit_zero else code)


@app.command()
def monitor(
    reference: Annotated[Path, typer.Option(help="Label JSONL of the reference window.")],
    incoming: Annotated[
        Path, typer.Option(help="Folder of prediction batches (*.jsonl): with --follow, the service's capture.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results and history.jsonl.")] = Path(
        "monitoring/runs"
    ),
    webhook: Annotated[str | None, typer.Option(help="POST each drifted window's verdict here.")] = None,
    workspace: Annotated[
        Path | None, typer.Option(help="Evidently workspace to add snapshots to (`evidently ui --workspace`).")
    ] = Path("monitoring/workspace"),
    follow: Annotated[
        bool, typer.Option(help="Run on: judge each institution's window as it fills or ends; serve /metrics.")
    ] = False,
    metrics_host: Annotated[str, typer.Option(help="With --follow: where Prometheus scrapes /metrics.")] = "127.0.0.1",
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="With --follow: the /metrics port.")] = 9108,
    interval: Annotated[
        float, typer.Option(min=0.1, help="With --follow: seconds between reads of the capture.")
    ] = 10.0,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Judge every institution and time window of the incoming batches against the reference; keep a
    history. Exit codes as `drift`. With --follow, run until stopped and resume where it stopped."""
    from deberta_rad import monitor as monitoring

    settings = load_params(params).monitoring
    reference_records = data.read_label_records(reference)
    if follow:
        metrics_address = (metrics_host, metrics_port)
        _follow(reference_records, incoming, output, settings, webhook, workspace, metrics_address, interval)
        return
    results, failures = monitoring.monitor_folder(reference_records, incoming, output, settings, webhook, workspace)
    typer.echo(monitoring.format_windows(results))
    typer.echo(f"history: {output / 'history.jsonl'}; plot: {output / 'drift_history.png'}")
    for failure in failures:
        typer.secho(f"alert not delivered: {failure}", fg=typer.colors.RED, err=True)
    code = monitoring.exit_code(results)
    raise typer.Exit(code=monitoring.EXIT_ALERT_FAILED if failures and code == monitoring.EXIT_DRIFT else code)


def _follow(
    reference: list[LabelRecord],
    capture: Path,
    output: Path,
    settings: MonitoringParams,
    webhook: str | None,
    workspace: Path | None,
    metrics_address: tuple[str, int],
    interval: float,
) -> None:
    """The long-lived monitor: verdicts on the console, metrics on /metrics, until interrupted."""
    from deberta_rad.live_monitor import LiveMonitor, describe

    if not capture.is_dir():
        raise data.InputError(f"{capture}: no such folder (the service's DEBERTA_RAD_SERVE_CAPTURE_DIR)")
    live = LiveMonitor(reference, capture, output, settings, webhook=webhook, workspace=workspace)
    host, port = metrics_address
    try:
        live.metrics.serve(host, port)
    except OSError as error:
        _fail(f"--metrics-host {host} --metrics-port {port}: cannot listen there ({error.strerror})")
    output.mkdir(parents=True, exist_ok=True)
    typer.echo(f"following {capture}; metrics on http://{host}:{port}/metrics; history {output / 'history.jsonl'}")
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):  # systemd, Kubernetes and Ctrl-C stop between polls
        signal.signal(signal_number, lambda *_: stop.set())
    for results in live.follow(interval, stop):
        for result in results:
            typer.echo(describe(result))
    typer.echo("stopped; a restart resumes where this stopped")


@app.command(name="relabel-on-alert")
def relabel_on_alert(
    host: Annotated[str, typer.Option(help="Where Alertmanager reaches this receiver.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port (monitoring/alertmanager.yml: 9109).")] = 9109,
    reports: Annotated[
        Path | None, typer.Option(help="Every institution's reports as they arrive (params relabel.feed).")
    ] = None,
    project: Annotated[Path, typer.Option(help="The project checkout the relabel loop runs in.")] = Path("."),
) -> None:
    """Receive Alertmanager's label-drift alerts and run the relabel loop (pipelines/relabel) for each
    drifted institution, once per alert episode; GET /jobs shows what was queued and how it went."""
    from deberta_rad.alert_relabel import relabel_queue, serve

    project = project.resolve()
    if not (project / "pipelines/relabel/dvc.yaml").is_file():
        raise data.InputError(f"--project {project}: not a deberta-rad checkout (no pipelines/relabel/dvc.yaml)")
    jobs = relabel_queue(project, reports)
    if jobs.feed.is_dir():
        raise data.InputError(
            f"--reports {jobs.feed}: a folder; the feed is a JSONL or CSV file with each report's institution"
        )
    try:
        server = serve(jobs, host, port)
    except OSError as error:
        _fail(f"--host {host} --port {port}: cannot listen there ({error.strerror})")
    typer.echo(f"relabel-on-alert on http://{host}:{port}/alerts; jobs in {jobs.folder}; feed {jobs.feed}")
    if not jobs.feed.exists():
        typer.secho(f"warning: the feed {jobs.feed} does not exist yet: an alert before it does gets 500", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped; queued jobs run again at the next start")


@app.command()
def relabel(
    reports: Annotated[Path, typer.Option(help="The new institution's reports (JSONL/CSV/folder).")],
    predictions: Annotated[
        Path | None, typer.Option(help="The model's predictions on them, to send the least certain first.")
    ] = None,
    institution: Annotated[str | None, typer.Option(help="Only this institution's reports.")] = None,
    budget: Annotated[int | None, typer.Option(help="Reports to send to the teacher (params relabel.budget).")] = None,
    when_drift: Annotated[
        Path | None, typer.Option(help="A drift.json: relabel only if it found drift (for the DVC loop).")
    ] = None,
    summary_out: Annotated[Path | None, typer.Option("--summary", help="Write the counts as JSON here.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Send a budgeted sample to the teacher (params `pseudo_label`) and append it to the store that
    ingest reads (params `ingest.relabeled`); then `dvc repro` retrains."""
    from dataclasses import asdict

    from deberta_rad.data import AppendOnlyStore
    from deberta_rad.relabel import RelabelSummary, relabel_files
    from deberta_rad.teachers import get_teacher, llm_options
    from deberta_rad.teachers.llm import LLMTeacherError

    config = load_params(params)
    teacher = config.pseudo_label.teacher
    if not config.ingest.relabeled:
        raise ParamsError(f"{params}: ingest.relabeled is null: name the file ingest reads relabelled reports from")
    store = Path(config.ingest.relabeled)
    if when_drift is not None and not json.loads(when_drift.read_text())["drift_detected"]:
        typer.echo(f"{when_drift}: no drift, nothing sent to the teacher")
        if summary_out:
            unchanged = RelabelSummary(0, 0, 0, len(AppendOnlyStore(store).records()))
            _write_json(summary_out, asdict(unchanged) | {"drift_detected": False})
        return
    cache = Path(config.pseudo_label.cache) if config.pseudo_label.cache else None
    options = (
        llm_options(config.pseudo_label.llm_model, cache, batch=config.pseudo_label.batch) if teacher == "llm" else {}
    )
    try:
        summary = relabel_files(
            reports,
            predictions,
            store,
            budget if budget is not None else config.relabel.budget,
            get_teacher(teacher, **options).label,
            institution,
            corpus_path=Path("data/reports.jsonl"),
        )
    except LLMTeacherError as err:
        _fail(f"{err}\n{store} keeps every chunk labelled before this; run the same command again to go on")
    typer.echo(summary.describe(store))
    if summary_out:
        _write_json(summary_out, asdict(summary) | {"drift_detected": True})
    typer.echo(f"next: dvc add {store} (to version it) and dvc repro (to retrain)")


@app.command(name="evaluate")
def evaluate_command(
    predictions: Annotated[Path, typer.Option(help="Predicted label JSONL.")],
    gold: Annotated[Path, typer.Option(help="Gold labels (label JSONL, CheXpert CSV, CheX-GPT JSONL, IU JSONL).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    gold_format: Annotated[str, typer.Option(help="auto | labels | chexpert | chexgpt | iu | radlabels")] = "auto",
) -> None:
    """Score predictions against gold with the DESIGN.md section 5 metrics and print the tables."""
    metrics = evaluate.score_files(predictions, gold, gold_format)
    typer.echo(format_metrics_table(metrics) if "status_f1" in metrics else format_presence_table(metrics))
    if json_out:
        _write_json(json_out, metrics)


@app.command()
def compare(
    labelers: Annotated[list[Path], typer.Argument(help="Label JSONL files; the first is compared with each other.")],
    gold: Annotated[Path, typer.Option(help="Status gold (label JSONL, CheXpert CSV, CheX-GPT JSONL).")],
    gold_format: Annotated[str, typer.Option(help="auto | labels | chexpert | chexgpt | radlabels")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full comparison here.")] = None,
    all_pairs: Annotated[bool, typer.Option(help="Compare every pair, not only the first with the others.")] = False,
    n_bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples over reports.")] = 2000,
    seed: int = 0,
) -> None:
    """Labelers side by side on one gold: Macro F1, paired t-test and Wilcoxon over per-finding F1, a
    paired bootstrap 95% CI of the difference, and where they disagree (report ids only)."""
    from deberta_rad.gold import read_gold

    names = [str(path) if [p.stem for p in labelers].count(path.stem) > 1 else path.stem for path in labelers]
    gold_set = read_gold(gold, gold_format)
    if gold_set.kind != "status":
        raise ValueError(f"{gold} holds presence-only gold: compare needs statuses (use evaluate for presence F1)")
    predictions = {
        name: data.labels_by_id(data.read_label_records(path)) for name, path in zip(names, labelers, strict=True)
    }
    comparison = compare_labelers(
        gold_set.labels,
        predictions,
        n_bootstrap=n_bootstrap,
        seed=seed,
        all_pairs=all_pairs,
        findings=gold_set.findings,
    )
    typer.echo(format_comparison_table(comparison))
    if json_out:
        _write_json(json_out, comparison)


@app.command()
def register(
    model_dir: Annotated[Path, typer.Option()] = Path("models/student"),
    metrics: Annotated[Path, typer.Option(help="Evaluation metrics JSON to attach.")] = Path("metrics/evaluate.json"),
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("metrics/register.json"),
) -> None:
    """Log the model to its MLflow run, register a version of `deberta-rad`, set the aliases."""
    from deberta_rad.registry import register_model

    result = register_model(model_dir, json.loads(metrics.read_text()))
    _write_json(output, result)
    typer.echo(f"registered {result['name']} version {result['version']} (aliases: {', '.join(result['aliases'])})")


# The test split the evaluate stage scores (dvc.yaml); `promote` scores a champion evaluated on other test data there.
TEST_SPLIT = Path("data/splits/test")


@app.command()
def promote(
    version: Annotated[int | None, typer.Option(help="Version to promote (default: the `challenger`).")] = None,
    force: Annotated[bool, typer.Option(help="Promote even when the gate refuses (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why --force overrides the gate; kept as a version tag.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Move alias `champion` to a version if it passes the gate in params `promote`: on the same test data,
    Macro F1 not lower and no finding's F1 down by more than `max_finding_drop`.

    Exit codes: 0 promoted (or already champion), 1 refused by the gate, 2 usage or registry error.
    """
    from deberta_rad import promote as promotion
    from deberta_rad.registry import CHAMPION
    from deberta_rad.tracking import configure_mlflow, require_registry

    if force and not (reason or "").strip():
        _fail("--force needs --reason TEXT (it is recorded on the version)")
    if reason and not force:
        _fail("--reason goes with --force")
    loaded = load_params(params) if params.is_file() else None
    config = loaded.promote if loaded else PromoteParams()
    batch_size = (loaded.evaluate if loaded else EvaluateParams()).batch_size
    require_registry()
    configure_mlflow()
    candidate, champion = promotion.promotion_candidates(version)
    if champion is not None and champion.version == candidate.version:
        typer.echo(f"version {candidate.version} is already {CHAMPION}; nothing to do")
        return
    gate = detail = None
    if champion is not None:
        rescored = promotion.champion_on_candidates_test_data(champion, candidate, TEST_SPLIT, batch_size)
        if rescored is not None:
            detail = (
                f"champion version {champion.version} was evaluated on other test data: scored again on "
                f"{TEST_SPLIT}, the candidate's"
            )
            typer.echo(detail)
        reference = promotion.gate_reference(config, rescored or champion, candidate)
        gate = promotion.promotion_gate(rescored or champion, candidate, reference, config.max_finding_drop)
        typer.echo(promotion.format_gate_table(gate))
        if not gate.passed and not force:
            typer.secho(
                f"refused: {CHAMPION} stays version {champion.version} (override: --force --reason TEXT)",
                err=True,
            )
            raise typer.Exit(code=1)
    promotion.promote_version(candidate, champion, gate, reason, detail)
    previous = f"was version {champion.version}" if champion else "there was none"
    forced = " (forced past the gate)" if gate and not gate.passed else ""
    typer.echo(f"promoted version {candidate.version} to {CHAMPION}{forced}; {previous}")


@app.command()
def evaluate_split(
    model: Annotated[Path, typer.Option(help="Model directory.")] = Path("models/student"),
    split_dir: Annotated[Path, typer.Option(help="A split folder written by `split`.")] = TEST_SPLIT,
    json_out: Annotated[Path, typer.Option("--json")] = Path("metrics/evaluate.json"),
    plots_dir: Annotated[Path, typer.Option()] = Path("plots"),
    disagreements: Annotated[
        Path,
        typer.Option(
            help="Markdown report of the student-teacher disagreements by finding and phrase "
            "(holds report phrases: stays local)."
        ),
    ] = Path("data/student_vs_teacher.md"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Label a split with the student and score it against the teacher (and ground truth and reviewed
    gold if any); the metrics go to DVC (the JSON and plots) and to the model's MLflow training run, the disagreements
    with the teacher by phrase to a local file."""
    from deberta_rad.tracking import log_evaluation

    batch_size = load_params(params).evaluate.batch_size
    results = evaluate.evaluate_split(model, split_dir, plots_dir, batch_size, disagreements)
    for reference in ("teacher", "gold", "reviewed"):
        if reference in results:
            source = results[reference]["source"]
            typer.echo(
                f"\n== student vs {reference} ({source}) on {split_dir} ==\n{format_metrics_table(results[reference])}"
            )
    if "teacher" in results:
        typer.echo(
            f"\n{results['teacher']['disagreements']['n_cells']} report x finding cells differ from the teacher: "
            f"by finding and phrase in {disagreements}"
        )
    typer.echo(f"\ninference: {results['inference']['reports_per_s']:.1f} reports/s")
    _write_json(json_out, results)
    run_id = log_evaluation(model, results, [json_out, *sorted(plots_dir.glob("confusion_*.png"))])
    typer.echo(f"logged the evaluation to MLflow run {run_id}")
