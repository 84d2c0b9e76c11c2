"""Classification metrics from predictions (numpy only, so the on-device runtime can use them)."""

from __future__ import annotations

import numpy as np


def classification_metrics(preds: np.ndarray, labels: np.ndarray, classes: list[str], loss: float | None = None) -> dict:
    """Top-1, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    preds = np.asarray(preds).astype(np.int64)
    labels = np.asarray(labels).astype(np.int64)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (labels, preds), 1)
    support = conf.sum(1)
    per_class = {c: (float(conf[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    out = {
        "top1": float((preds == labels).mean()) if len(labels) else 0.0,
        "n": int(len(labels)),
        "per_class": per_class,
        "confusion": conf.tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out
