"""Label reports with a trained student: one inference engine for the CLI, evaluation, serving and
monitoring.

Reports are tokenised once (one batched call of the fast tokenizer), sorted by length and cut into
batches under a token budget, so little padding is computed; results go back in input order. The model
runs under `torch.inference_mode` with the backbone's SDPA attention where it has one, in bf16 where the
hardware computes it natively (a GPU, or a CPU with AMX / AVX512-BF16), or, behind a setting, as an
ONNX Runtime graph with int8 dynamically quantised weights on CPU. `deberta-rad bench` measures each
path's speed and its label agreement with the plain fp32 loop.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from deberta_rad.data import write_atomically, write_jsonl
from deberta_rad.model import Student
from deberta_rad.parallel import chunked
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, Report, TeacherInfo
from deberta_rad.sentences import aggregate_reports, report_sentences
from deberta_rad.settings import get_settings

BACKENDS = ("torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
# The engine feeds the model these inputs only; BERT-style token types default to zeros.
MODEL_INPUTS = ("input_ids", "attention_mask")

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
# Token budget per batch when the settings name none.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}
ONNX_OPSET = 17
# Part of the ONNX cache key: graphs exported another way are not reused.
ONNX_RECIPE = f"torchscript-opset{ONNX_OPSET}-eager-attention-ort-fusion"
# Reports per chunk when labelling a stream: enough for well-filled length-sorted batches, and far
# more than a pipeline's test split, whose predictions are then those of one `label` call.
STREAM_CHUNK_REPORTS = 8192


class EngineConfigError(ValueError):
    """A backend / precision / device combination the engine cannot run."""


@dataclass
class Predictions:
    """Status indices [N, 13] and probabilities [N, 13, 4], in the order the texts were given."""

    statuses: np.ndarray
    probabilities: np.ndarray


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware multiplies bf16 natively. On a CPU without AMX or AVX512-BF16 oneDNN emulates
    bf16, which is slower than fp32, so `auto` keeps fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch.backends.mkldnn reports bf16 "supported" on any AVX512 CPU (emulated); these two probes (no
    # public equivalent) say whether the instructions exist.
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(backend: str, precision: str, device: torch.device) -> str:
    """The precision `auto` stands for here, or a clear error for a combination that does not exist."""
    if backend not in BACKENDS:
        raise EngineConfigError(f"engine backend must be one of {BACKENDS}, not {backend!r}")
    if precision not in PRECISIONS:
        raise EngineConfigError(f"engine precision must be one of {PRECISIONS}, not {precision!r}")
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise EngineConfigError("the onnxruntime backend runs on CPU; on a GPU use the torch backend (bf16)")
        if precision == "bf16":
            raise EngineConfigError("the onnxruntime backend runs fp32 or int8, not bf16")
        return "fp32" if precision == "auto" else precision
    if precision == "int8":
        raise EngineConfigError("int8 is the onnxruntime backend's (DEBERTA_RAD_ENGINE_BACKEND=onnxruntime)")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def length_sorted_batches(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped shortest first into batches of at most ``max_batch_size`` reports whose padded size
    (reports x longest) stays within ``max_batch_tokens``, so short reports go in large batches and long
    ones in small batches. A single report longer than the budget still gets a batch of its own."""
    batches: list[np.ndarray] = []
    current: list[int] = []
    for index in np.argsort(lengths, kind="stable"):
        too_many = len(current) == max_batch_size or (len(current) + 1) * lengths[index] > max_batch_tokens
        if current and too_many:
            batches.append(np.array(current))
            current = []
        current.append(int(index))
    if current:
        batches.append(np.array(current))
    return batches


def torch_runner(student: Student, device: torch.device, precision: str) -> Runner:
    """The student on ``device`` in ``precision`` (the engine owns the model from here on)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = student.model.to(device=device, dtype=dtype).eval()

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(batch[k]).to(device, non_blocking=True) for k in MODEL_INPUTS}
        return model(**inputs).logits.float().cpu().numpy()

    return run


def parameter_mb(model: torch.nn.Module) -> float:
    """The model's weights and buffers in memory, in their dtype."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


def weights_digest(student: Student) -> str:
    """A hash of the student's config and weights and of the export recipe: the key of its ONNX graphs."""
    recipe = {"config": student.model.config.to_dict(), "recipe": ONNX_RECIPE, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for name, tensor in student.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_onnx(student: Student, path: Path) -> None:
    """Export the student (encoder and heads) to ONNX with dynamic batch and sequence axes, then let ONNX
    Runtime fuse attention, GELU and LayerNorm where it knows the backbone (BERT-style encoders).

    torch.onnx rather than Optimum, because Optimum exports only the architectures it knows and these
    heads sit on any backbone. The TorchScript exporter with eager attention rather than the dynamo
    one: ONNX Runtime's fusions match the graph it writes (on MiniLM, 6 of 6 attention blocks fused
    against none from the dynamo graph of SDPA; int8 labelled about 1.6x faster fused)."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    example = student.tokenizer(["no acute cardiopulmonary process", "clear lungs"], padding=True, return_tensors="pt")
    model = student.model.float().cpu().eval()
    model.encoder.set_attn_implementation("eager")
    axes = {"batch": 0, "sequence": 1}
    torch.onnx.export(
        model,
        tuple(example[k] for k in MODEL_INPUTS),
        str(path),
        input_names=list(MODEL_INPUTS),
        output_names=["logits"],
        dynamic_axes={**{k: {v: n for n, v in axes.items()} for k in MODEL_INPUTS}, "logits": {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    encoder = model.encoder.config
    if encoder.model_type in MODEL_TYPES:
        fused = optimize_model(
            str(path),
            model_type=encoder.model_type,
            num_heads=encoder.num_attention_heads,
            hidden_size=encoder.hidden_size,
        )
        fused.save_model_to_file(str(path))


def onnx_graph(student: Student, precision: str, cache_dir: Path) -> Path:
    """The student's ONNX graph (int8: with dynamically quantised weights), exported once per weights
    into the model cache and reused by later engines."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise EngineConfigError("the onnxruntime backend needs: pip install 'deberta-rad[onnx]'") from err

    folder = cache_dir / "onnx" / weights_digest(student)
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        write_atomically(fp32, lambda target: export_onnx(student, target), suffix=".onnx")
    if precision == "fp32":
        return fp32
    int8 = folder / "model.int8.onnx"
    if not int8.is_file():
        # Per-channel weights with the reduced range kept the most labels of the settings measured
        # (README "Speed"); activations are quantised per batch at run time.
        write_atomically(
            int8,
            lambda target: quantize_dynamic(
                fp32,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
                # The fused operators are outside ONNX's own domain, so shape inference cannot type them.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            ),
            suffix=".onnx",
        )
    return int8


def onnxruntime_runner(graph: Path) -> Runner:
    """An ONNX Runtime CPU session on the student's graph, with as many threads as torch uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["logits"], {k: batch[k].astype(np.int64) for k in MODEL_INPUTS})[0]

    return run


class LabelingEngine:
    """Length-sorted, token-budgeted batched inference, results in input order.

    The engine takes the student over: it moves the model to the device and precision it runs in.
    backend, precision and max_batch_tokens default to the settings (DEBERTA_RAD_ENGINE_*)."""

    def __init__(
        self,
        student: Student,
        batch_size: int = 64,
        device: str | None = None,
        backend: str | None = None,
        precision: str | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        settings = get_settings()
        self.student = student
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_tokens = (
            max_batch_tokens or settings.engine_max_batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type]
        )
        self.backend = backend or settings.engine_backend
        self.precision = resolve_precision(self.backend, precision or settings.engine_precision, self.device)
        if self.backend == "onnxruntime":
            graph = onnx_graph(student, self.precision, settings.model_cache)
            self.run = onnxruntime_runner(graph)
            self.weights_mb = graph.stat().st_size / 2**20
        else:
            self.run = torch_runner(student, self.device, self.precision)
            self.weights_mb = parameter_mb(student.model)

    def describe(self) -> dict[str, object]:
        """What runs where, for benchmarks and logs."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": str(self.device),
            # The ONNX graph carries its own (fused where ONNX Runtime knows the backbone).
            "attention": self.student.model.encoder.config._attn_implementation if self.backend == "torch" else "onnx",
            "max_batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "weights_mb": self.weights_mb,
        }

    def predict(self, texts: Sequence[str], progress: bool = False) -> Predictions:
        """Score report texts; batching follows token length, the output follows the input. A
        sentence-level student labels each distinct sentence once and each report aggregates its own."""
        if self.student.unit == "report":
            probabilities = self._score(texts, progress, "report")
        else:
            sentences = [report_sentences(text) for text in texts]
            distinct = list(dict.fromkeys(s for report in sentences for s in report))
            scored = dict(zip(distinct, self._score(distinct, progress, "sentence"), strict=True))
            probabilities = aggregate_reports(sentences, scored)
        return Predictions(statuses=probabilities.argmax(-1), probabilities=probabilities)

    def _score(self, texts: Sequence[str], progress: bool, unit: str) -> np.ndarray:
        """[N, 13, 4] probabilities of the model's inputs, one per text."""
        tokenizer = self.student.tokenizer
        probabilities = np.zeros((len(texts), len(FINDINGS), len(STATUSES)), dtype=np.float32)
        if not texts:  # the tokenizer refuses an empty batch
            return probabilities
        encoded = tokenizer(list(texts), truncation=True, max_length=self.student.max_length)["input_ids"]
        batches = length_sorted_batches([len(ids) for ids in encoded], self.batch_size, self.max_batch_tokens)
        bar = tqdm(total=len(texts), desc="labelling", unit=unit, disable=not progress)
        with torch.inference_mode(), bar:
            for rows in batches:
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="np")
                probabilities[rows] = torch.from_numpy(self.run(batch)).softmax(dim=-1).numpy()
                bar.update(len(rows))
        return probabilities

    def label_stream(
        self,
        reports: Iterable[Report],
        model_name: str,
        progress: bool = False,
        chunk_size: int = STREAM_CHUNK_REPORTS,
    ) -> Iterator[LabelRecord]:
        """`label` over a stream, a chunk at a time (each chunk length-sorted within itself), so memory does
        not grow with the input; an input within one chunk gets exactly `label`'s records."""
        for chunk in chunked(reports, chunk_size):
            yield from self.label(chunk, model_name, progress)

    def label(self, reports: Sequence[Report], model_name: str, progress: bool = False) -> list[LabelRecord]:
        """Label records with probabilities, tagged with the model that made them."""
        predictions = self.predict([r.text for r in reports], progress=progress)
        info = TeacherInfo(name="deberta-rad", model=model_name)
        return [
            prediction_record(
                report.report_id, predictions.probabilities[i], info, report.institution, report.study_date
            )
            for i, report in enumerate(reports)
        ]


def load_engine(model_dir: str | Path, batch_size: int = 64, **options: str | int | None) -> LabelingEngine:
    """The engine on a saved model directory, as every command and the service build it."""
    from deberta_rad.model import load_student

    return LabelingEngine(load_student(model_dir), batch_size=batch_size, **options)


def status_probabilities(row: np.ndarray) -> dict[str, float]:
    """One finding's probabilities as {status: p}, rounded for JSON."""
    return {status: round(float(p), 6) for status, p in zip(STATUSES, row, strict=True)}


def prediction_record(
    report_id: str,
    probabilities: np.ndarray,
    info: TeacherInfo,
    institution: str | None = None,
    timestamp: str | None = None,
) -> LabelRecord:
    """A report's [13, 4] probabilities as a label record: the most likely status of every finding and
    the probabilities, with the model and, for monitoring, where and when the report comes from."""
    return LabelRecord(
        report_id=report_id,
        labels={f: STATUSES[int(row.argmax())] for f, row in zip(FINDINGS, probabilities, strict=True)},
        probabilities={f: status_probabilities(row) for f, row in zip(FINDINGS, probabilities, strict=True)},
        teacher=info,
        institution=institution,
        timestamp=timestamp,
    )


def engine_for(model_ref: str, batch_size: int = 64) -> tuple[LabelingEngine, str]:
    """The engine on a model directory or MLflow URI, and the model's name for the records."""
    from deberta_rad.registry import resolve_model

    model_dir, model_name = resolve_model(model_ref)
    return load_engine(model_dir, batch_size=batch_size), model_name


def predict_reports(model_ref: str, reports: Sequence[Report], batch_size: int = 64) -> tuple[list[LabelRecord], float]:
    """Label reports with a model directory or MLflow URI; returns the records and reports/s."""
    engine, model_name = engine_for(model_ref, batch_size)
    started = time.perf_counter()
    records = engine.label(reports, model_name=model_name, progress=True)
    return records, len(reports) / max(time.perf_counter() - started, 1e-9)


def predict_to_file(model_ref: str, reports: Iterable[Report], output: Path, batch_size: int = 64) -> tuple[int, float]:
    """Label a stream of reports into label JSONL (atomically), a chunk at a time; returns the count and
    reports/s."""
    engine, model_name = engine_for(model_ref, batch_size)
    started = time.perf_counter()
    count = write_jsonl(output, engine.label_stream(reports, model_name, progress=True))
    return count, count / max(time.perf_counter() - started, 1e-9)
