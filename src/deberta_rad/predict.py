"""Label reports with a trained student: one inference engine for the CLI, evaluation, serving and
monitoring. Reports are tokenised once, sorted by length and batched so little padding is computed,
and results are put back in input order."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from deberta_rad.model import Student
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, Report, TeacherInfo


@dataclass
class Predictions:
    """Status indices [N, 13] and probabilities [N, 13, 4], in the order the texts were given."""

    statuses: np.ndarray
    probabilities: np.ndarray


class LabelingEngine:
    """Length-sorted batched inference under `torch.inference_mode`."""

    def __init__(self, student: Student, batch_size: int = 64, device: str | None = None) -> None:
        self.student = student
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = student.model.to(self.device).eval()

    def predict(self, texts: Sequence[str], progress: bool = False) -> Predictions:
        """Score texts; batching follows token length, the output follows the input."""
        tokenizer = self.student.tokenizer
        encoded = tokenizer(list(texts), truncation=True, max_length=self.student.max_length)["input_ids"]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        probabilities = np.zeros((len(texts), len(FINDINGS), len(STATUSES)), dtype=np.float32)
        starts = range(0, len(order), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="labelling", unit="batch", disable=not progress):
                rows = order[start : start + self.batch_size]
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                probabilities[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Predictions(statuses=probabilities.argmax(-1), probabilities=probabilities)

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


def predict_reports(model_ref: str, reports: Sequence[Report], batch_size: int = 64) -> tuple[list[LabelRecord], float]:
    """Label reports with a model directory or MLflow URI; returns the records and reports/s."""
    from deberta_rad.model import load_student
    from deberta_rad.registry import resolve_model

    model_dir, model_name = resolve_model(model_ref)
    engine = LabelingEngine(load_student(model_dir), batch_size=batch_size)
    started = time.perf_counter()
    records = engine.label(reports, model_name=model_name, progress=True)
    return records, len(reports) / max(time.perf_counter() - started, 1e-9)
