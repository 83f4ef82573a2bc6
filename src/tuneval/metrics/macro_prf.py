"""Macro-averaged F1, precision and recall over classes (scikit-learn), one config name each.

Macro averaging weighs every class equally, so a majority-class guesser scores low.
Labels absent from both predictions and references are still counted when ``labels`` is
given, which keeps scores comparable between runs that miss a rare class.
"""

import datasets
import evaluate
from sklearn.metrics import precision_recall_fscore_support


class MacroPRF(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Macro-averaged F1 / precision / recall; config name picks which.",
            citation="",
            inputs_description="predictions, references: lists of int class ids; labels: optional list of all ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        labels: list[int] | None = None,
    ) -> dict[str, float]:
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predictions, labels=labels, average="macro", zero_division=0
        )
        which = self.config_name if self.config_name in ("f1", "precision", "recall") else "f1"
        return {which: float({"f1": f1, "precision": precision, "recall": recall}[which])}
