"""Test-time evaluation: score videos with any number of clips x crops, ensemble checkpoints, write results.

The arithmetic is pure numpy (tested against hand-computed values):
    view scores  = softmax of the logits of every view (clip x crop) of a video, averaged over views
    ensemble     = the per-video scores of several checkpoints, averaged by video key
    top-k        = the label is among the k highest scores
    mean class accuracy = the mean over classes of the top-1 accuracy inside each class
    pair accuracy = for order-dependent class pairs (a, b): score[label] > score[partner], i.e. the right
                    choice within the pair (chance = 0.5), whatever the other classes score
`score_videos` runs a model over a test loader (x_NVTCHW, labels_N, keys) and returns the scores by key;
`write_report` writes results.json, predictions.jsonl and a confusion-matrix PNG.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- pure arithmetic


def average_view_scores(logits_NVK: np.ndarray | torch.Tensor) -> np.ndarray:
    """(videos, views, classes) logits -> (videos, classes) softmax scores averaged over the views."""
    logits = torch.as_tensor(logits_NVK, dtype=torch.float64)
    return logits.softmax(dim=-1).mean(dim=1).numpy()


def topk_correct(scores_NK: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
    """Boolean per video: the label is among the k highest scores (ties broken by the lower class index)."""
    k = min(k, scores_NK.shape[1])
    topk = np.argsort(-scores_NK, axis=1, kind="stable")[:, :k]
    return (topk == np.asarray(labels_N)[:, None]).any(axis=1)


def confusion_matrix(pred_N: np.ndarray, labels_N: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[true, predicted] = number of videos."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels_N), np.asarray(pred_N)), 1)
    return cm


def mean_class_accuracy(cm: np.ndarray) -> float:
    """Mean over the classes that occur of the fraction of their videos predicted right."""
    per_class = cm.sum(axis=1)
    present = per_class > 0
    return float((np.diag(cm)[present] / per_class[present]).mean()) if present.any() else float("nan")


def pair_accuracy(scores_NK: np.ndarray, labels_N: np.ndarray, pairs: Sequence[tuple[int, int]]) -> float:
    """Accuracy of choosing the right class within its pair, over the videos whose label belongs to a pair."""
    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    rows = [(i, y, partner[y]) for i, y in enumerate(np.asarray(labels_N).tolist()) if y in partner]
    if not rows:
        return float("nan")
    idx, y, other = (np.array(c) for c in zip(*rows))
    return float((scores_NK[idx, y] > scores_NK[idx, other]).mean())


def ensemble(score_sets: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Average several {video key: scores} sets over the keys they all hold (warning about the others)."""
    if not score_sets:
        raise ValueError("ensemble of no score sets: give at least one checkpoint")
    common = set(score_sets[0]).intersection(*score_sets[1:])
    dropped = set().union(*score_sets) - common
    if dropped:
        log.warning("ensemble: %d videos are not scored by every checkpoint and are left out", len(dropped))
    if not common:
        raise ValueError("the checkpoints scored no video in common: were they evaluated on the same split?")
    return {k: np.mean([s[k] for s in score_sets], axis=0) for k in sorted(common)}


def metrics(
    scores: Mapping[str, np.ndarray],
    labels: Mapping[str, int],
    num_classes: int,
    pairs: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    keys = sorted(scores)
    scores_NK = np.stack([scores[k] for k in keys])
    labels_N = np.array([labels[k] for k in keys])
    cm = confusion_matrix(scores_NK.argmax(axis=1), labels_N, num_classes)
    out = {
        "videos": len(keys),
        "top1": float(topk_correct(scores_NK, labels_N, 1).mean()),
        "top5": float(topk_correct(scores_NK, labels_N, 5).mean()),
        "mean_class_accuracy": mean_class_accuracy(cm),
    }
    if pairs:
        out["pair_accuracy"] = pair_accuracy(scores_NK, labels_N, pairs)
    return out


def class_pairs(index: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The order-dependent class pairs of a dataset: its index's `pairs` ([[a, b], ...]) if it declares them;
    the synthetic demo set (`name` "synthetic") pairs classes 2k and 2k+1 (a clip and its time reversal)."""
    if "pairs" in index:
        return [(int(a), int(b)) for a, b in index["pairs"]]
    if index.get("name") == "synthetic":
        n = len(index.get("classes", []))
        return [(k, k + 1) for k in range(0, n - 1, 2)]
    return []


# ---------------------------------------------------------------------------------------------- model running


@torch.no_grad()
def score_videos(model: torch.nn.Module, loader, *, autocast) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Scores (softmax averaged over the V views) and labels of every video of a test loader, by key.

    `autocast` is a zero-argument callable returning the run's precision context (runtime.autocast).
    Scores stay on the device until the end: one transfer, not one per batch.
    """
    model.eval()
    batches, all_keys = [], []
    for x_NVTCHW, labels_N, keys in loader:
        n, v = x_NVTCHW.shape[:2]
        with autocast():
            logits = model(x_NVTCHW.flatten(0, 1))
        probs_NK = logits.float().softmax(dim=-1).view(n, v, -1).mean(dim=1)
        batches.append((probs_NK, labels_N))
        all_keys += list(keys)
    if not batches:
        return {}, {}
    scores_NK = torch.cat([b[0] for b in batches]).cpu().double().numpy()
    labels_N = torch.cat([b[1] for b in batches]).cpu().numpy()
    return (
        {k: scores_NK[i] for i, k in enumerate(all_keys)},
        {k: int(labels_N[i]) for i, k in enumerate(all_keys)},
    )


# --------------------------------------------------------------------------------------------------- reports


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(4 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(k), classes, fontsize="small")
        if k <= 16:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            str(cm[i, j]),
                            ha="center",
                            va="center",
                            color="white" if rates[i, j] > 0.5 else "black",
                            fontsize="small",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    out_dir: Path,
    scores: Mapping[str, np.ndarray],
    labels: Mapping[str, int],
    classes: Sequence[str],
    *,
    pairs: Sequence[tuple[int, int]] = (),
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json (metrics + meta), predictions.jsonl (a line per video), confusion.png; returns metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = metrics(scores, labels, len(classes), pairs)
    keys = sorted(scores)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for k in keys:
            top5 = np.argsort(-scores[k], kind="stable")[:5]
            f.write(
                json.dumps(
                    {
                        "key": k,
                        "label": labels[k],
                        "pred": int(top5[0]),
                        "top5": [int(c) for c in top5],
                        "top5_scores": [round(float(scores[k][c]), 6) for c in top5],
                    }
                )
                + "\n"
            )
    cm = confusion_matrix(
        np.array([scores[k].argmax() for k in keys]), np.array([labels[k] for k in keys]), len(classes)
    )
    plot_confusion(cm, classes, out_dir / "confusion.png", f"top-1 {result['top1']:.1%} ({len(keys)} videos)")
    (out_dir / "results.json").write_text(json.dumps({**result, **(meta or {})}, indent=2) + "\n")
    return result
