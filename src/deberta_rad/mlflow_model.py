"""The MLflow pyfunc wrapper, logged as "models from code" so no Python object is pickled.

MLflow executes this file when `mlflow.pyfunc.load_model("models:/deberta-rad@champion")` is called;
the student's model directory travels as the artifact named `student`.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from deberta_rad.predict import load_engine
from deberta_rad.schema import FINDINGS, STATUSES


class DebertaRadPyfunc(PythonModel):
    """Input: a frame with `report_id` and `text`; output: `report_id` and one status column per finding."""

    def load_context(self, context: PythonModelContext) -> None:
        self.engine = load_engine(context.artifacts["student"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        statuses = self.engine.predict(model_input["text"].astype(str).tolist()).statuses
        frame = pd.DataFrame([[STATUSES[i] for i in row] for row in statuses], columns=list(FINDINGS))
        frame.insert(0, "report_id", model_input["report_id"].astype(str).tolist())
        return frame


mlflow.models.set_model(DebertaRadPyfunc())
