"""train.py's choices, checked against what the run wrote: best.pt changes only on a better validation top-1
and holds that score as its own best_top1; --resume refuses another number of processes; `evaluate` with
dense sampling, full-resolution crops and twice_sample builds the views those options name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import tiny_cfg

import evaluation
import runtime
import train
from pipeline import torch_loader


def short_cfg(index: Path, out: Path, *extra: str):
    """Batch 8: 4 steps an epoch on the 32 tiny clips."""
    return tiny_cfg(index, out, "--data.batch_size", "8", "--optim.base_batch", "8", *extra)


def scripted_validation(monkeypatch, scores: list[float]) -> None:
    """evaluation.validate runs as usual but reports these top-1 values, one per validation."""
    queue = iter(scores)
    real = evaluation.validate
    monkeypatch.setattr(evaluation, "validate", lambda *a: {**real(*a), "top1": next(queue)})


def saved(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "scores, best_epoch",
    [
        ([0.5, 0.25, 0.5], 1),  # worse, then only equal: best.pt stays the epoch-1 checkpoint
        ([0.25, 0.5, 0.75], 3),  # better every epoch
        ([0.25, 0.75, 0.5], 2),
    ],
)
def test_best_checkpoint_changes_only_on_a_better_top1(tiny_index, tmp_path, monkeypatch, scores, best_epoch):
    scripted_validation(monkeypatch, scores)
    best_writes = []
    real_copy = train.checkpoints.copy_atomic
    monkeypatch.setattr(
        train.checkpoints,
        "copy_atomic",
        lambda src, dst: (best_writes.append(saved(src)["state"]["epoch"]), real_copy(src, dst)),
    )
    result = train.train(short_cfg(tiny_index, tmp_path, "--optim.epochs", "3"))
    assert result["epoch"] == 3 and result["best_top1"] == max(scores)
    best, last = saved(tmp_path / "best.pt"), saved(tmp_path / "last.pt")
    improved = [e + 1 for e, s in enumerate(scores) if s > max([-1.0, *scores[:e]])]
    assert best_writes == improved  # written after exactly the epochs that beat every earlier one
    assert best["state"]["epoch"] == best_epoch
    # best.pt's own best_top1 is its own validation score (metrics.jsonl's line for its epoch)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert best["state"]["best_top1"] == metrics[best_epoch - 1]["top1"] == max(scores)
    assert last["state"]["best_top1"] == max(scores)
    if best_epoch != 3:  # an older epoch's weights, not the last ones
        assert any(not torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_resume_refuses_another_number_of_processes(tiny_index, tmp_path):
    cfg = short_cfg(tiny_index, tmp_path, "--run.max_steps", "1")
    assert train.train(cfg)["stopped_early"]
    ckpt = saved(tmp_path / "last.pt")
    assert len(ckpt["rng"]) == 1  # one process, one RNG state
    resume = short_cfg(tiny_index, tmp_path, "--resume")
    assert train.load_resume(resume, tmp_path, runtime.Dist())["state"]["step"] == 1
    with pytest.raises(train.TrainingError, match=r"ranks \(torchrun --nproc_per_node x nodes\) 1 -> 2"):
        train.load_resume(resume, tmp_path, runtime.Dist(rank=0, world_size=2))
    # a checkpoint of a 2-process run, resumed by one process
    ckpt["rng"] = ckpt["rng"] * 2
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(train.TrainingError, match=r"1 -> 2|2 -> 1") as err:
        train.train(resume)
    assert "2 -> 1" in str(err.value) and "--tune-from" in str(err.value)


@pytest.fixture(scope="module")
def one_epoch(tiny_index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-epoch")
    train.train(short_cfg(tiny_index, out, "--optim.epochs", "1"))
    return out / "best.pt"


def evaluate_recording_views(monkeypatch, checkpoint: Path, out: Path, *overrides: str):
    """evaluate with these --eval.* options; returns (report, the Views of each video, input shapes)."""
    views, shapes = [], []
    real_views = torch_loader.make_views
    monkeypatch.setattr(torch_loader, "make_views", lambda *a: views.append(real_views(*a)) or views[-1])
    real_score = evaluation.score_videos

    class Recorded:  # the loader as score_videos sees it (it takes len() for its progress), shapes noted
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for x, *rest in self.loader:
                shapes.append(tuple(x.shape))
                yield x, *rest

    def score(model, loader, **kw):
        return real_score(model, Recorded(loader), **kw)

    monkeypatch.setattr(evaluation, "score_videos", score)
    report = evaluation.evaluate([str(checkpoint)], [*overrides, "--eval.out", str(out)])
    assert report["videos"] == 16  # every val video once
    return report, views, shapes


def test_evaluate_twice_sample_takes_the_centres_and_the_starts(one_epoch, tmp_path, monkeypatch):
    _, views, shapes = evaluate_recording_views(
        monkeypatch, one_epoch, tmp_path, "--eval.num_clips", "2", "--eval.twice_sample", "true"
    )
    assert len(views) == 16
    for v in views:
        assert v.u.tolist() == [[0.5] * 4, [0.0] * 4]
        assert v.boxes.shape == (1, 4) and v.out_size == 28
    assert {s[1:] for s in shapes} == {(2, 4, 3, 28, 28)}  # 2 views of 4 frames each


def test_evaluate_full_res_takes_3_crops_of_the_whole_short_side(one_epoch, tmp_path, monkeypatch):
    _, views, shapes = evaluate_recording_views(
        monkeypatch, one_epoch, tmp_path, "--eval.num_crops", "3", "--eval.full_res", "true"
    )
    for v in views:
        sides = v.boxes[:, 2:] - v.boxes[:, :2]
        assert (sides == 32).all() and v.out_size == 32  # scale_size crops of 32x32 frames, not crop_size
    assert {s[1:] for s in shapes} == {(3, 4, 3, 32, 32)}


def test_evaluate_dense_takes_evenly_spaced_windows(one_epoch, tmp_path, monkeypatch):
    report, views, shapes = evaluate_recording_views(
        monkeypatch,
        one_epoch,
        tmp_path,
        "--eval.sampling",
        "dense",
        "--data.dense_stride",
        "2",
        "--eval.num_clips",
        "2",
    )
    for v in views:
        # one draw per window, repeated over its frames: windows at (c + 0.5) / 2 of the free span
        np.testing.assert_array_equal(v.u, [[0.25] * 4, [0.75] * 4])
    assert {s[1:] for s in shapes} == {(2, 4, 3, 28, 28)}
    assert json.loads((tmp_path / "results.json").read_text())["eval"]["sampling"] == "dense"
    assert 0 <= report["top1"] <= report["top5"] <= 1
