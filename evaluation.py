"""Test-time evaluation: score videos with any number of clips x crops, ensemble checkpoints, write results.

The arithmetic is pure numpy (tested against hand-computed values):
    view scores  = softmax of the logits of every view (clip x crop) of a video, averaged over views
    ensemble     = the per-video scores of several checkpoints, averaged by video key
    top-k        = the label is among the k highest scores
    mean class accuracy = the mean over classes of the top-1 accuracy inside each class
    pair accuracy = for order-dependent class pairs (a, b): score[label] > score[partner], i.e. the right
                    choice within the pair (chance = 0.5), whatever the other classes score
`score_videos` runs a model over a test loader (x_NVTCHW, labels_N, keys) and returns the scores by key;
`write_report` writes results.json, predictions.jsonl and a confusion-matrix PNG; `evaluate` is
`python train.py evaluate CKPT [CKPT ...]`; `validate` is the validation pass inside training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

import config
import progress
import runtime
from checkpoints import checkpoint_model
from pipeline import LoaderConfig, build_loader
from pipeline.shards import read_index

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- pure arithmetic


def average_view_scores(logits_NVK: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(videos, views, classes) logits -> (videos, classes) softmax scores averaged over the views, on the
    logits' device, in float32 or wider."""
    logits = torch.as_tensor(logits_NVK)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).mean(dim=1)


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
def score_videos(
    model: torch.nn.Module, loader, *, autocast, label: str = ""
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Scores (softmax averaged over the V views) and labels of every video of a test loader, by key.

    `autocast` is a zero-argument callable returning the run's precision context (runtime.autocast).
    Scores stay on the device until the end: one transfer, not one per batch. A `label` shows progress
    under it (progress.track: a bar on a terminal, log lines elsewhere).
    """
    model.eval()
    batches, all_keys = [], []
    for x_NVTCHW, labels_N, keys in progress.track(loader, len(loader), label, enabled=bool(label)):
        n, v = x_NVTCHW.shape[:2]
        with autocast():
            logits = model(x_NVTCHW.flatten(0, 1))
        probs_NK = average_view_scores(logits.view(n, v, -1))
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


MATRIX_MAX_CLASSES = 30  # above this a confusion matrix is a grid of unreadable cells: show what it hides


def most_confused(cm: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, videos), largest first (ties: lower indices)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    cells = [(int(i), int(j)) for i, j in zip(*np.unravel_index(order, cm.shape))]
    return [(i, j, int(off[i, j])) for i, j in cells if off[i, j] > 0]


def class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Top-1 accuracy per class (NaN for a class without videos)."""
    videos = cm.sum(axis=1)
    return np.where(videos > 0, np.diag(cm) / np.maximum(videos, 1), np.nan)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """The confusion matrix up to MATRIX_MAX_CLASSES classes; above, what a reader looks for in one: the most
    confused pairs, the worst classes, and every class's accuracy sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(classes) > MATRIX_MAX_CLASSES:
        fig = _confusion_summary(plt, cm, classes, title)
    else:
        fig = _confusion_matrix(plt, cm, classes, title)
    fig.savefig(path)
    plt.close(fig)


def _confusion_matrix(plt, cm: np.ndarray, classes: Sequence[str], title: str):
    k = len(classes)
    size = 4 + 0.35 * k
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100, layout="constrained")
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(k), classes, fontsize="small")
    if k <= 16:
        for i, j in zip(*np.nonzero(cm)):
            color = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def _confusion_summary(plt, cm: np.ndarray, classes: Sequence[str], title: str, rows: int = 25):
    acc = class_accuracy(cm)
    fig, (pairs_ax, worst_ax, all_ax) = plt.subplots(
        1, 3, figsize=(19, 0.3 * rows + 2), dpi=100, layout="constrained", width_ratios=(1.25, 1, 0.8)
    )
    pairs = most_confused(cm, rows)
    labels = [f"{classes[i]} -> {classes[j]}" for i, j, _ in pairs]
    share = [n / max(cm[i].sum(), 1) for i, _, n in pairs]
    bars = pairs_ax.barh(range(len(pairs)), [n for *_, n in pairs], color="tab:red")
    pairs_ax.bar_label(bars, [f"{n} ({p:.0%})" for (*_, n), p in zip(pairs, share)], fontsize="x-small")
    pairs_ax.set_yticks(range(len(pairs)), labels, fontsize="small")
    pairs_ax.margins(x=0.1)
    pairs_ax.set_xlabel("videos of the true class predicted as the other (share of the true class)")
    pairs_ax.set_title(f"the {len(pairs)} most confused pairs: true -> predicted")
    present = np.flatnonzero(~np.isnan(acc))
    worst = present[np.argsort(acc[present], kind="stable")[:rows]]
    bars = worst_ax.barh(range(len(worst)), acc[worst], color="tab:orange")
    worst_ax.bar_label(bars, [f"{a:.0%}" for a in acc[worst]], fontsize="x-small")
    worst_ax.set_yticks(range(len(worst)), [classes[c] for c in worst], fontsize="small")
    worst_ax.set_xlim(0, 1)
    worst_ax.set_xlabel("top-1 accuracy")
    worst_ax.set_title(f"the {len(worst)} least accurate classes")
    for ax in (pairs_ax, worst_ax):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    ranked = np.sort(acc[present])[::-1]
    all_ax.plot(np.arange(1, len(ranked) + 1), ranked)
    all_ax.axhline(ranked.mean(), linestyle="--", color="grey", linewidth=1)
    all_ax.annotate(
        f"mean class accuracy {ranked.mean():.1%}", (1, ranked.mean()), va="bottom", fontsize="small"
    )
    all_ax.set_ylim(0, 1.02)
    all_ax.set_xlabel("class, most to least accurate")
    all_ax.set_ylabel("top-1 accuracy")
    all_ax.set_title(f"all {len(ranked)} classes with videos, sorted")
    all_ax.grid(True, alpha=0.3)
    fig.suptitle(f"{title}, {len(classes)} classes")
    return fig


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


# ------------------------------------------------------------------------------------------- entry points


@torch.no_grad()
def validate(net, loader, dist: runtime.Dist, device: torch.device, precision: str) -> dict[str, float]:
    """Loss, top-1 and top-5 over the val split (each rank its part, summed over ranks)."""
    net.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    for x_NTCHW, labels_N in loader:
        with runtime.autocast(precision, device.type):
            logits = net(x_NTCHW)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, labels_N, reduction="sum").double()
        sums[1] += (top5[:, 0] == labels_N).sum()
        sums[2] += (top5 == labels_N[:, None]).any(1).sum()
        sums[3] += labels_N.shape[0]
    loss, top1, top5, n = runtime.all_reduce_sum(sums, dist).tolist()
    net.train()
    return {"loss": loss / max(n, 1), "top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "videos": int(n)}


def eval_loader_config(cfg: config.Config) -> LoaderConfig:
    """The loader settings of a test: the run's data settings with the --eval.* sampling, batch size and
    crop size (the test's own, next to training's). The views (clips, crops) are not loader settings:
    build_loader takes them from cfg.eval, a pipeline.TestViews."""
    test, data = cfg.eval, cfg.data
    return dataclasses.replace(
        data,
        sampling=test.sampling,
        batch_size=test.batch_size,
        crop_size=data.scale_size if test.full_res else data.crop_size,
    )


def eval_config(cfg: config.Config, overrides: Sequence[str] = ()) -> config.Config:
    """A checkpoint's config with any override applied and validated, its loader set up for a test."""
    cfg = config.validate(config.apply_overrides(cfg, overrides))
    cfg.data = eval_loader_config(cfg)
    return cfg


def score_checkpoint(path: str, overrides: Sequence[str], dist: runtime.Dist, device: torch.device):
    """(scores, labels, classes, cfg) of one checkpoint over its eval split, gathered from every rank."""
    named = any(o.split("=")[0] in ("--model.name", "--model") for o in overrides)
    plain = config.validate(config.apply_overrides(config.Config(), overrides)) if named else None
    model, cfg, classes = checkpoint_model(path, device, plain)
    cfg = eval_config(cfg, overrides)
    precision = runtime.resolve_precision(cfg.run.precision, device)
    runtime.use_cpu_threads(device, cfg.run.threads, cfg.data.workers)  # as training does
    net = runtime.setup_model(model, device=device, channels_last=cfg.model.channels_last, compile=False)
    loader = build_loader(
        cfg.data,
        split=cfg.eval.split,
        mode="test",
        rank=dist.rank,
        world_size=dist.world_size,
        device=device,
        views=cfg.eval,
    )
    if classes and list(loader.classes) != classes:
        diff = next(
            (i for i, (a, b) in enumerate(zip(classes, loader.classes)) if a != b),
            min(len(classes), len(loader.classes)),
        )
        raise config.ConfigError(
            f"{path} was trained on {len(classes)} classes and {cfg.data.index} has {len(loader.classes)}, "
            f"differing from class {diff}: evaluate on the dataset it was trained on (--data.index), or "
            f"fine-tune it on this one with --tune-from"
        )
    scores, labels = score_videos(
        net,
        loader,
        autocast=lambda: runtime.autocast(precision, device.type),
        label=f"evaluate {path}" if dist.is_main else "",
    )
    if dist.enabled:  # every rank scored its own videos: gather them on rank 0
        parts: list[Any] = [None] * dist.world_size
        torch_dist.all_gather_object(parts, (scores, labels))
        scores = {k: v for s, _ in parts for k, v in s.items()}
        labels = {k: v for _, lab in parts for k, v in lab.items()}
    return scores, labels, classes or list(loader.classes), cfg


def evaluate(
    checkpoints: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    dist: runtime.Dist | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Test every checkpoint with the --eval.* views, ensemble their scores by video key, write the report.

    `overrides` (the command line's `--section.field VALUE`s) apply to each checkpoint's own config, so an
    8- and a 16-frame model keep their frame counts. `dist` and `device` are the process's, as training
    resolved them; without them (`python train.py evaluate`) they are resolved here, from --run.device and
    --run.dist_backend. Under torchrun every rank scores its share; rank 0 writes the report, the others
    return {}.
    """
    if not checkpoints:
        raise config.ConfigError(
            "evaluate needs at least one checkpoint: python train.py evaluate RUN/best.pt [...]"
        )
    if dist is None or device is None:
        run = config.apply_overrides(config.Config(), overrides).run  # the device and backend to evaluate on
        dist, device = runtime.init_distributed(run.device, run.dist_backend)
    first: config.Config | None = None
    score_sets, labels, per_checkpoint, classes = [], {}, {}, []
    for path in checkpoints:
        scores, labels_here, classes, cfg = score_checkpoint(str(path), overrides, dist, device)
        first = first or cfg
        score_sets.append(scores)
        labels.update(labels_here)
        per_checkpoint[str(path)] = metrics(scores, labels_here, len(classes))
        log.info(
            "%s (%s, T=%d, %d clip(s) x %d crop(s)): top-1 %.2f%%",
            path,
            cfg.model.name,
            cfg.data.num_segments,
            cfg.eval.num_clips,
            cfg.eval.num_crops,
            100 * per_checkpoint[str(path)]["top1"],
        )
    if not dist.is_main or first is None:
        runtime.barrier(dist)  # the ranks end together: one that tears its process group down early aborts
        return {}
    index = read_index(first.data.index)
    out = Path(first.eval.out or Path(checkpoints[0]).parent / f"eval-{first.eval.split}")
    meta = {
        "checkpoints": [str(p) for p in checkpoints],
        "per_checkpoint": per_checkpoint,
        "eval": config.to_dict(first)["eval"],
        "index": first.data.index,
    }
    result = write_report(out, ensemble(score_sets), labels, classes, pairs=class_pairs(index), meta=meta)
    runtime.barrier(dist)
    return {**result, "out": str(out), "per_checkpoint": per_checkpoint}
