"""evaluation.py arithmetic against hand-computed values: view averaging, top-k, class accuracy, pairs,
ensembles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import evaluation as E


def test_views_are_averaged_as_softmax_scores_not_logits():
    # video 0: views with logits (0, ln 3) and (ln 3, 0) -> softmax (1/4, 3/4) and (3/4, 1/4) -> (1/2, 1/2)
    # video 1: logits (0, 0) -> (1/2, 1/2) and (0, ln 4) -> (1/5, 4/5) -> (0.35, 0.65)
    logits = np.array([[[0.0, math.log(3)], [math.log(3), 0.0]], [[0.0, 0.0], [0.0, math.log(4)]]])
    scores = E.average_view_scores(logits).numpy()
    np.testing.assert_allclose(scores, [[0.5, 0.5], [(0.5 + 0.2) / 2, (0.5 + 0.8) / 2]])


def test_topk_and_confusion_and_mean_class_accuracy():
    scores = np.array(
        [
            [0.1, 0.6, 0.3],  # label 1: top-1 right
            [0.5, 0.3, 0.2],  # label 2: top-1 wrong (0), top-2 wrong, top-3 right
            [0.2, 0.5, 0.3],  # label 2: top-1 wrong (1), top-2 right
            [0.7, 0.2, 0.1],
        ]
    )  # label 0: right
    labels = np.array([1, 2, 2, 0])
    assert E.topk_correct(scores, labels, 1).tolist() == [True, False, False, True]
    assert E.topk_correct(scores, labels, 2).tolist() == [True, False, True, True]
    assert E.topk_correct(scores, labels, 5).all()  # k above the class count means all classes
    cm = E.confusion_matrix(scores.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    # per class: class 0 1/1, class 1 1/1, class 2 0/2 -> mean 2/3 (top-1 overall is 2/4)
    assert E.mean_class_accuracy(cm) == pytest.approx(2 / 3)
    # a class with no videos does not count
    assert E.mean_class_accuracy(E.confusion_matrix(np.array([0]), np.array([0]), 3)) == 1.0


def test_pair_accuracy_ignores_classes_outside_the_pair():
    scores = np.array(
        [
            [0.2, 0.1, 0.7, 0.0],  # label 0 (pair 0-1): 0.2 > 0.1 right although class 2 wins
            [0.4, 0.3, 0.3, 0.0],  # label 1: 0.3 < 0.4 wrong
            [0.0, 0.0, 0.4, 0.6],  # label 2 (pair 2-3): wrong
            [0.5, 0.0, 0.1, 0.4],
        ]
    )  # label 3: 0.4 > 0.1 right
    assert E.pair_accuracy(scores, np.array([0, 1, 2, 3]), [(0, 1), (2, 3)]) == 0.5
    assert math.isnan(E.pair_accuracy(scores, np.array([0, 1]), [(2, 3)]))


def test_ensemble_averages_by_key_over_common_videos():
    a = {"v1": np.array([0.8, 0.2]), "v2": np.array([0.4, 0.6]), "only_a": np.array([1.0, 0.0])}
    b = {"v2": np.array([0.8, 0.2]), "v1": np.array([0.2, 0.8])}
    out = E.ensemble([a, b])
    assert sorted(out) == ["v1", "v2"]
    np.testing.assert_allclose(out["v1"], [0.5, 0.5])
    np.testing.assert_allclose(out["v2"], [0.6, 0.4])
    # the ensemble changes a decision: v2 is class 1 for a alone, class 0 for the pair
    m = E.metrics(out, {"v1": 0, "v2": 0}, 2)
    assert m["top1"] == 1.0 and m["videos"] == 2
    with pytest.raises(ValueError, match="no video in common"):
        E.ensemble([{"x": np.zeros(2)}, {"y": np.zeros(2)}])


def test_report_files(tmp_path):
    scores = {"a": np.array([0.9, 0.1]), "b": np.array([0.3, 0.7]), "c": np.array([0.6, 0.4])}
    labels = {"a": 0, "b": 1, "c": 1}
    result = E.write_report(tmp_path, scores, labels, ["left", "right"], pairs=[(0, 1)], meta={"note": "x"})
    assert result["top1"] == pytest.approx(2 / 3) and result["pair_accuracy"] == pytest.approx(2 / 3)
    assert result["mean_class_accuracy"] == pytest.approx((1 + 0.5) / 2)
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(x["key"], x["pred"]) for x in lines] == [("a", 0), ("b", 1), ("c", 0)]
    assert json.loads((tmp_path / "results.json").read_text())["note"] == "x"
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_videos_averages_the_views_of_a_test_loader():
    import contextlib

    import torch

    class Linear(torch.nn.Module):  # logits = the first pixel of the first frame of each view, for 2 classes
        def forward(self, x_NTCHW):
            return x_NTCHW[:, 0, :2, 0, 0]

    x = torch.zeros(1, 2, 1, 3, 1, 1)  # 1 video, 2 views, T=1
    x[0, 0, 0, :2, 0, 0] = torch.tensor([0.0, math.log(3)])
    x[0, 1, 0, :2, 0, 0] = torch.tensor([0.0, 0.0])
    scores, labels = E.score_videos(
        Linear(), [(x, torch.tensor([1]), ["vid"])], autocast=contextlib.nullcontext
    )
    np.testing.assert_allclose(scores["vid"], [(0.25 + 0.5) / 2, (0.75 + 0.5) / 2])
    assert labels == {"vid": 1}
