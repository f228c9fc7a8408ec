"""Accuracy, per-class accuracy and confusion matrix for NLVR2 (true/false) and SNLI-VE.

The model generates its answer as text, so a prediction is compared after `strip().lower()`, and a
prediction outside the label set counts as wrong and lands in the confusion matrix's last column,
"<other>". Labels may be strings, bytes or booleans (NLVR2's True/False).
"""
from typing import Any, Sequence

NLVR2_CLASSES = ("true", "false")
SNLI_VE_CLASSES = ("entailment", "neutral", "contradiction")
OTHER = "<other>"


def _label(x: Any) -> str:
  if isinstance(x, bytes):
    x = x.decode("utf-8")
  return str(x).strip().lower()


def classification_metrics(predictions: Sequence[Any], labels: Sequence[Any],
                           classes: Sequence[str]) -> dict[str, Any]:
  """{"accuracy", "per_class_accuracy", "confusion_matrix", "confusion_columns"}, accuracies x100.

  confusion_matrix[i][j] counts examples of true class classes[i] predicted as confusion_columns[j]
  (the classes, then OTHER). per_class_accuracy[c] is the accuracy over the examples whose label is
  c (their recall); classes without examples are left out.
  """
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  if len(labels) == 0:
    raise ValueError("no examples to score")
  columns = list(classes) + [OTHER]
  index = {c: i for i, c in enumerate(classes)}
  matrix = [[0] * len(columns) for _ in classes]
  for prediction, label in zip(predictions, labels):
    true = _label(label)
    if true not in index:
      raise ValueError(f"label {label!r} is not one of {tuple(classes)}")
    matrix[index[true]][index.get(_label(prediction), len(classes))] += 1
  correct = sum(matrix[i][i] for i in range(len(classes)))
  return {
      "accuracy": 100.0 * correct / len(labels),
      "per_class_accuracy": {c: 100.0 * matrix[i][i] / sum(matrix[i])
                             for i, c in enumerate(classes) if sum(matrix[i])},
      "confusion_matrix": matrix,
      "confusion_columns": columns,
  }


def _flat(result: dict[str, Any], classes: Sequence[str]) -> dict[str, float]:
  """seqio wants one number per key: accuracies, then confusion counts as "confusion/true->pred"."""
  metrics = {"accuracy": result["accuracy"]}
  for c, acc in result["per_class_accuracy"].items():
    metrics[f"accuracy_{c}"] = acc
  for c, row in zip(classes, result["confusion_matrix"]):
    for column, count in zip(result["confusion_columns"], row):
      metrics[f"confusion/{c}->{column}"] = float(count)
  return metrics


def nlvr2_metric(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """seqio metric fn for NLVR2: targets are "true"/"false" (or booleans)."""
  return _flat(classification_metrics(predictions, targets, NLVR2_CLASSES), NLVR2_CLASSES)


def snli_ve_metric(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """seqio metric fn for SNLI-VE: targets are entailment/neutral/contradiction."""
  return _flat(classification_metrics(predictions, targets, SNLI_VE_CLASSES), SNLI_VE_CLASSES)
