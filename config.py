"""The one configuration of a gcvideo run: nested dataclasses, presets as functions, CLI overrides.

    cfg = preset("gc_tsm_r50_k400_8f")
    cfg = apply_overrides(cfg, ["--optim.lr", "0.01", "--data.batch_size=16", "--resume"])
    validate(cfg)          # raises ConfigError naming the field and what to do

Any field can be overridden from the command line as `--<section>.<field> VALUE` (or `=VALUE`); booleans also
accept a bare `--<section>.<field>` (true) or `--no-<section>.<field>` (false); tuples take comma-separated
values. A few common fields have short aliases (`--resume`, `--tune-from`, `--pretrained`, `--no-compile`,
`--out`, ...).
The resolved config is written as `<run>/config.json` and inside every checkpoint (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import models
from pipeline import LoaderConfig, TestViews
from pipeline.loader import option

log = logging.getLogger("config")


class ConfigError(ValueError):
    """A bad option or value; the message names the option and says what to do."""


@dataclass
class ModelConfig:
    name: str = option("gc_tsm_mini", "the architecture: one of models.list_models() (python -m models)")
    num_classes: int = option(0, "classifier outputs; 0: the number of classes of the dataset's index.json")
    dropout: float = option(0.5, "dropout before the classifier")
    shift_div: int = option(8, "TSM: 1/shift_div of the channels shift each way in time")
    shift_place: Literal["blockres", "block"] = option(
        "blockres", "TSM: shift inside each residual branch (blockres) or before each block (block)"
    )
    cdiv: int = option(4, "GC: the channels are calibrated in groups of planes/cdiv")
    gc_loop: bool = option(False, "GC: rotate the calibrator-to-group assignment per block")
    ratio: int = option(16, "single-calibrator (ecal_*) models: planes/ratio channels are calibrated")
    partial_bn: bool = option(
        False, "TSN's partial BN: every BatchNorm of the backbone but the first stays in eval mode, frozen"
    )
    pretrained: str = option(
        "", "'' (random init) | imagenet | path to an ImageNet state_dict (torchvision names)"
    )
    channels_last: bool = option(
        True, "NHWC memory format (faster on GPUs, slower for the mini models on CPUs)"
    )
    compile: bool = option(True, "torch.compile the model (runtime.setup_model)")
    sync_bn: bool = option(False, "convert BatchNorm to SyncBatchNorm under DDP on GPUs")

    def build_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of models.build_model that this config sets."""
        return {
            "dropout": self.dropout,
            "shift_div": self.shift_div,
            "shift_place": self.shift_place,
            "cdiv": self.cdiv,
            "gc_loop": self.gc_loop,
            "ratio": self.ratio,
            "partial_bn": self.partial_bn,
            "pretrained": self.pretrained or None,
        }


@dataclass
class OptimConfig:
    lr: float = option(
        0.02, "learning rate for base_batch clips per step; scaled linearly to the global batch"
    )
    base_batch: int = option(128, "the global batch that --optim.lr is given for")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(1e-4, "L2 weight decay of conv and linear weights (not of norms and biases)")
    epochs: int = option(50, "epochs to train (the schedule's length)")
    schedule: Literal["step", "cosine"] = option("step", "step: x lr_decay at each of lr_steps; cosine: to 0")
    lr_steps: tuple[float, ...] = option(
        (20, 40), "epochs at which the step schedule multiplies the lr by lr_decay"
    )
    lr_decay: float = option(0.1, "the step schedule's factor")
    warmup_epochs: float = option(
        0.0, "linear warm-up from warmup_start_factor x lr over this many epochs (clipped to a short run)"
    )
    warmup_start_factor: float = option(0.1, "the warm-up's first lr, as a fraction of the lr")
    clip_grad: float = option(20.0, "max total gradient norm; 0 turns clipping off")
    gc_lr_mult: float = option(
        1.0, 'lr multiplier of the GC parameters ("GC lr x5" of the GC release scripts)'
    )
    fc_lr_mult: float = option(5.0, "lr multiplier of the new classifier when fine-tuning (--tune-from only)")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")


@dataclass
class RunConfig:
    out: str = option("runs/demo", "run directory: config.json, last.pt, best.pt, metrics.jsonl, tb/")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast precision; auto: bf16 on CUDA, fp32 on CPUs (emulated bf16 is ~10x slower)"
    )
    seed: int = option(0, "seed of the model's initialisation and random streams (each rank adds its rank)")
    resume: bool = option(False, "continue from <out>/last.pt exactly where it stopped")
    overwrite: bool = option(False, "train into an --run.out that holds an earlier run, replacing it")
    tune_from: str = option("", "checkpoint to fine-tune from: backbone loaded, classifier replaced")
    ckpt_every: int = option(0, "also write last.pt every k steps (0: at the end of every epoch only)")
    eval_every: int = option(1, "epochs between validations (the last epoch is always validated)")
    log_every: int = option(
        20,
        "steps between reads of the on-device metrics (the only host syncs): the live bar's update, or a "
        "log line where there is no terminal",
    )
    max_steps: int = option(0, "stop (with a checkpoint) after this many steps in total; 0: no limit")
    target_top1: float = option(
        0.0, "end training once a validation reaches this top-1 (0: train every epoch)"
    )
    time_budget_min: float = option(
        0.0,
        "end training after the epoch past which another one would overrun this many minutes (0: no limit)",
    )
    tensorboard: bool = option(True, "TensorBoard scalars in <out>/tb")
    live: bool = option(
        True, "progress on rank 0: a rich bar on a terminal, a log line every log_every steps without one"
    )
    threads: int = option(0, "torch intra-op threads on a CPU; 0: the cores the loader's workers leave free")
    dist_backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", "torch.distributed backend; auto: nccl on CUDA, gloo on CPUs"
    )
    final_eval: bool = option(
        True, "after training, test best.pt with the --eval.* views and print a summary"
    )


@dataclass
class EvalConfig(TestViews):
    """The test's settings: the views (num_clips, num_crops, twice_sample: pipeline.TestViews, their one
    home; evaluation hands this config to build_loader as them) and the test's own loader settings."""

    split: str = option("val", "the index's split to evaluate")
    sampling: Literal["tsn", "dense"] = option("tsn", "frame sampling at test time (see --data.sampling)")
    full_res: bool = option(False, "crops of scale_size x scale_size instead of crop_size")
    batch_size: int = option(8, "videos per batch (each with num_clips x num_crops views)")
    out: str = option("", "results directory; '' -> <first checkpoint's run>/eval-<split>")


@dataclass
class RecipeConfig:
    """Where a preset's numbers come from, saved in config.json with the rest (docs/models.md lists them)."""

    source: str = option("", "the release script (or page) whose numbers the run follows")
    deviations: tuple[str, ...] = option((), "where the run departs from its source, and why")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    preset: str = "demo"


# Loader fields that are not options: the config sets them from other settings (resolve), so each setting
# has one home and one option.
DERIVED = {
    "--data.frames_per_segment": "follows from --model.name (TDN models take 5 frames a segment, others 1)",
}
# Options an earlier version had, and the one that replaces each: an old command line is told the new name.
# (A saved config.json that holds the old fields still loads: from_dict ignores fields that are gone.)
MOVED = {f"--data.{f.name}": f"--eval.{f.name}" for f in dataclasses.fields(TestViews)}


def frames_per_segment(model_name: str) -> int:
    """Consecutive frames per segment the model takes (models.parse_name: TDN 5, the others 1)."""
    return models.parse_name(model_name).get("frames_per_segment", 1)


def resolve(cfg: Config) -> Config:
    """Set the fields that follow from others: the loader's frames per segment from the model. preset,
    from_dict and validate call it, so a config is resolved wherever it is made or checked."""
    if cfg.model.name in models.list_models():  # an unknown name is reported by validate
        cfg.data.frames_per_segment = frames_per_segment(cfg.model.name)
    return cfg


# --------------------------------------------------------------------------------------------------- presets
# Each preset names its source (RecipeConfig.source) and lists where it departs from it (.deviations);
# docs/models.md holds the table of them that `python -m config --presets-table` prints.

GC_REPO = (
    "https://github.com/haoyanbin918/Group-Contextualization/blob/b99be50a8f6188ebc54f952699410cbe45398826"
)
TSM_REPO = (
    "https://github.com/mit-han-lab/temporal-shift-module/blob/1f6a834b02120441d99fa706b7a13ccc5293c6fa"
)
# "GC <path>" and "TSM <path>" sources name a file of these releases (presets_table links them).
SOURCE_REPOS = {"GC": GC_REPO, "TSM": TSM_REPO}
NO_LABEL_SWAP_FLIP = (
    "no flip: the release flips Something-Something with its 3 direction label pairs swapped "
    "(target_transforms); this loader has no label-swapping flip"
)


def demo() -> Config:
    """The embedded demo: gc_tsm_mini on the synthetic temporal dataset, a few minutes on a 2-core CPU."""
    cfg = Config(preset="demo")
    # On CPU cores channels_last and compilation make this tiny model slower (python -m benchmark model
    # --quick; docs/benchmark.md); the GPU presets keep both on.
    cfg.model = ModelConfig(name="gc_tsm_mini", dropout=0.0, channels_last=False, compile=False)
    cfg.data = LoaderConfig(
        index="data/synthetic/index.json",
        num_segments=8,
        crop_size=56,
        scale_size=64,
        scales=(1.0, 0.875),
        flip=False,
        batch_size=16,
        workers=1,  # one DALI thread keeps up with 64x64 MJPEG; torch takes the other cores
    )
    # The loss sits at chance (ln 8) for a few epochs while the model finds the motion cue, then drops.
    # Batch 16 (more updates per epoch) without dropout gets there; batch 32 with dropout 0.2 was still at
    # chance after 8 epochs.
    cfg.optim = OptimConfig(
        lr=0.02,
        base_batch=16,
        weight_decay=1e-4,
        epochs=16,
        schedule="cosine",
        lr_steps=(),
        warmup_epochs=1.0,
        clip_grad=20.0,
    )
    # The schedule is 16 epochs, but training ends at the first validation >= 92%: the demo must fit the
    # slowest 2-core CPUs. The time budget bounds the worst case (the target never reached): training stops
    # after the epoch past which another would overrun 6 minutes (`python -m benchmark demo` measures it).
    cfg.run = RunConfig(out="runs/demo", log_every=10, target_top1=0.92, time_budget_min=6.0)
    cfg.eval = EvalConfig(batch_size=32)
    cfg.recipe = RecipeConfig(
        source="gcvideo: tuned on the synthetic set (python -m benchmark demo times it)"
    )
    return cfg


def demo_tsn() -> Config:
    """The demo with a frame-order-blind TSN: the control that stays near chance on order-dependent pairs."""
    cfg = demo()
    cfg.preset = "demo_tsn"
    cfg.model.name = "tsn_mini"
    cfg.run.out = "runs/demo_tsn"
    cfg.run.target_top1 = 0.0  # the control never gets there: train the whole schedule
    cfg.run.time_budget_min = 0.0
    cfg.recipe = RecipeConfig(
        source="gcvideo: the demo preset with tsn_mini",
        deviations=("the whole 16-epoch schedule: no target top-1 and no time budget",),
    )
    return cfg


def _kinetics(name: str, model: str, frames: int) -> Config:
    """The TSM release's Kinetics-400 recipe (scripts/train_tsm_kinetics_rgb_8f.sh / _16f.sh): ImageNet init,
    lr 0.02 per 128 clips, step x0.1 at 20 and 40 of 50, dropout 0.5, clip 20, no partial BN (--npb)."""
    cfg = Config(preset=name)
    cfg.model = ModelConfig(name=model, dropout=0.5, pretrained="imagenet")
    cfg.data = LoaderConfig(
        index="data/k400/index.json",
        num_segments=frames,
        crop_size=224,
        scale_size=256,
        flip=True,
        batch_size=8 if frames == 8 else 4,
        workers=8,
    )
    cfg.optim = OptimConfig(
        lr=0.02, base_batch=128, epochs=50, schedule="step", lr_steps=(20, 40), clip_grad=20.0
    )
    cfg.run = RunConfig(out=f"runs/{name}", log_every=50, ckpt_every=1000)
    cfg.eval = EvalConfig(num_clips=10, num_crops=1, batch_size=2)
    cfg.recipe = RecipeConfig(source=f"TSM scripts/train_tsm_kinetics_rgb_{16 if frames == 16 else 8}f.sh")
    return cfg


# The GC repository publishes no Kinetics script: its Kinetics rows are trained with the TSM release's recipe.
GC_ON_TSM_KINETICS = (
    "GC on the TSM recipe: the GC repository has no Kinetics script",
    "GC parameters at the base lr: the GC scripts' --ef_lr5 (x5) is given for Something-Something V1 only",
)


def gc_tsm_r50_k400_8f() -> Config:
    cfg = _kinetics("gc_tsm_r50_k400_8f", "gc_tsm_r50", 8)
    cfg.recipe.deviations = GC_ON_TSM_KINETICS
    return cfg


def gc_tsm_r50_k400_16f() -> Config:
    cfg = _kinetics("gc_tsm_r50_k400_16f", "gc_tsm_r50", 16)
    cfg.recipe.deviations = GC_ON_TSM_KINETICS
    return cfg


def gc_tsn_r50_k400_8f() -> Config:
    cfg = _kinetics("gc_tsn_r50_k400_8f", "gc_tsn_r50", 8)
    cfg.recipe = RecipeConfig(
        source="TSM scripts/train_tsn_kinetics_rgb_5f.sh",
        deviations=(
            "8 segments, not 5: the GC README's GC-TSN Kinetics row is 8 x 1 x 10",
            *GC_ON_TSM_KINETICS,
        ),
    )
    return cfg


def tsm_r50_k400_8f() -> Config:
    return _kinetics("tsm_r50_k400_8f", "tsm_r50", 8)


def _something(name: str, model: str, frames: int, dataset: str) -> Config:
    """Something-Something V1 (and datasets trained like it) as the GC repository's train_tsm.sh trains it:
    ImageNet init, lr 0.01 for a batch of 32 (DataParallel, no scaling in its code), wd 1e-4, step x0.1 at
    20 and 40 of 50, dropout 0.5, clip 20, GC lr x5 (--ef_lr5), no partial BN (--npb); 2 clips x 1 centre
    crop at test (--twice_sample), the 224 x 224 the GC README reports Something-Something at."""
    cfg = _kinetics(name, model, frames)
    cfg.data.index = f"data/{dataset}/index.json"
    cfg.data.flip = False
    cfg.optim.lr, cfg.optim.base_batch = 0.01, 32
    cfg.optim.gc_lr_mult = 5.0 if "gc_" in model or "ecal_" in model else 1.0
    cfg.eval = EvalConfig(num_clips=2, num_crops=1, twice_sample=True, batch_size=4)
    cfg.recipe = RecipeConfig(
        source="GC train_tsm.sh",
        deviations=(
            NO_LABEL_SWAP_FLIP,
            "tested at 224 (the GC README's Something-Something setting); bash_test_tsntsmgst_gc.sh adds "
            "--full_res",
        ),
    )
    return cfg


def gc_tsm_r50_sthv1_8f() -> Config:
    return _something("gc_tsm_r50_sthv1_8f", "gc_tsm_r50", 8, "sthv1")


def gc_tsm_r50_sthv2_8f() -> Config:
    cfg = _something("gc_tsm_r50_sthv2_8f", "gc_tsm_r50", 8, "sthv2")
    cfg.recipe.deviations += ("Something-Something V2: the script trains V1",)
    return cfg


def gc_tsm_r50_sthv2_16f() -> Config:
    cfg = _something("gc_tsm_r50_sthv2_16f", "gc_tsm_r50", 16, "sthv2")
    cfg.recipe.deviations += ("Something-Something V2 at 16 segments: the script trains V1 at 8",)
    return cfg


def ecal_t_tsm_r50_sthv1_8f() -> Config:
    """The single-calibrator row of the GC tables: ECal-T on 1/16 of each block's channels (ratio 16)."""
    cfg = _something("ecal_t_tsm_r50_sthv1_8f", "ecal_t_tsm_r50", 8, "sthv1")
    cfg.model.ratio = 16
    cfg.recipe.deviations += (
        "one ECal-T on 1/16 of the channels: the release has no script for it (its models_tsm.py imports "
        "nets.ECal_TSM_S, which it does not ship)",
    )
    return cfg


def gc_gst_r50_sthv1_8f() -> Config:
    """GC-GST on Something-Something V1, the GC repository's train_gst.sh: --net M4 --cdiv 4 --loop --ef_lr5,
    lr 0.01 for batch 32, wd 1e-4, steps 20 / 40 of 50, dropout 0.5, clip 20, no partial BN (--npb); its
    bash_test_tsntsmgst_gc.sh tests 2 clips (--twice_sample) x 1 full-resolution crop (--full_res)."""
    cfg = _something("gc_gst_r50_sthv1_8f", "gc_gst_r50", 8, "sthv1")
    cfg.model.cdiv, cfg.model.gc_loop = 4, True
    cfg.eval.full_res = True
    cfg.recipe = RecipeConfig(source="GC train_gst.sh", deviations=(NO_LABEL_SWAP_FLIP,))
    return cfg


def gc_tdn_r50_sthv1_8f() -> Config:
    """GC-TDN on Something-Something V1, the GC repository's train_tdn.sh: 8 GPUs x 8 clips (DDP), lr 0.01
    (for 64), wd 5e-4, steps 30 / 45 / 55 of 60, dropout 0.5, clip 20, no partial BN, no warm-up (opts_tdn
    default 0), calibrators at lr x5 (ops_tdn/models_gc.py's ef groups), 5 frames per segment; tested as the
    GC README's 8 x 1 x 1 (one clip, centre crop at 224 after short side 256)."""
    cfg = _something("gc_tdn_r50_sthv1_8f", "gc_tdn_r50", 8, "sthv1")
    cfg.data.batch_size = 4  # per rank: 8 x 40 frames of 224 px is too much for many GPUs with autograd
    cfg.optim.base_batch = 64
    cfg.optim.weight_decay, cfg.optim.epochs, cfg.optim.lr_steps = 5e-4, 60, (30, 45, 55)
    cfg.eval = EvalConfig(num_clips=1, num_crops=1, batch_size=4)
    cfg.recipe = RecipeConfig(
        source="GC train_tdn.sh",
        deviations=(
            "4 clips a GPU, not 8: 40 frames of 224 px a clip; the lr follows the global batch",
            NO_LABEL_SWAP_FLIP,
        ),
    )
    return cfg


def gc_tsm_r50_jester_8f() -> Config:
    """Jester: hand gestures whose labels name directions (swiping left/right): trained like
    Something-Something, no flip."""
    cfg = _something("gc_tsm_r50_jester_8f", "gc_tsm_r50", 8, "jester")
    cfg.recipe.deviations = (
        "Jester, which the GC tables do not report: trained as the script trains Something-Something V1",
        "no flip: the labels name directions (swiping left / right)",
    )
    return cfg


def gc_tsm_r50_diving48_16f() -> Config:
    """Diving48 at 16 frames (the GC table's setting), trained like Something-Something. Flip stays on: the
    labels (take-off, somersaults, twists, flight position) do not change under a left-right mirror."""
    cfg = _something("gc_tsm_r50_diving48_16f", "gc_tsm_r50", 16, "diving48")
    cfg.data.flip = True
    cfg.eval = EvalConfig(num_clips=1, num_crops=1, batch_size=4)
    cfg.recipe.deviations = (
        "Diving48 at 16 segments, tested 1 clip x 1 crop (the GC README's row); the script trains "
        "Something-Something V1 at 8",
    )
    return cfg


def _dense_k400(name: str, model: str, checkpoint: str) -> Config:
    """Kinetics-400 with dense sampling (8 frames, stride 8) and the non-local test protocol (10 clips x 3
    full-resolution crops), as the TSM release's `..._e100_dense` files: 100 epochs."""
    cfg = _kinetics(name, model, 8)
    cfg.data.sampling, cfg.data.dense_stride = "dense", 8
    cfg.optim.epochs, cfg.optim.lr_steps = 100, (40, 80)
    cfg.eval = EvalConfig(num_clips=10, num_crops=3, sampling="dense", full_res=True, batch_size=1)
    cfg.recipe = RecipeConfig(
        source=f"TSM README.md (model zoo: {checkpoint}, tested --dense_sample --full_res)",
        deviations=(
            "no script published: train_tsm_kinetics_rgb_8f.sh's settings, dense, 100 epochs, the lr "
            "steps 20 / 40 of 50 scaled to 40 / 80",
        ),
    )
    return cfg


def tsm_r50_k400_8f_dense() -> Config:
    return _dense_k400(
        "tsm_r50_k400_8f_dense",
        "tsm_r50",
        "TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e100_dense",
    )


def tsm_r50_nl_k400_8f_dense() -> Config:
    return _dense_k400(
        "tsm_r50_nl_k400_8f_dense",
        "tsm_r50_nl",
        "TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e100_dense_nl",
    )


def tsm_mbv2_k400_8f() -> Config:
    """TSM MobileNetV2 on Kinetics-400 (the release's mobilenetv2 `_e100_dense` file: dense, 100 epochs)."""
    cfg = _dense_k400(
        "tsm_mbv2_k400_8f", "tsm_mbv2", "TSM_kinetics_RGB_mobilenetv2_shift8_blockres_avg_segment8_e100_dense"
    )
    cfg.data.batch_size = 16
    return cfg


def _finetune(name: str, dataset: str) -> Config:
    """Fine-tuned from a Kinetics checkpoint (--tune-from PATH), as TSM's UCF101 script: lr 0.001 per 64,
    steps at 10 and 20 of 25, dropout 0.8, the new classifier at lr x5."""
    cfg = _kinetics(name, "gc_tsm_r50", 8)
    cfg.model.dropout = 0.8
    cfg.model.pretrained = ""
    cfg.data.index = f"data/{dataset}/index.json"
    cfg.optim = OptimConfig(
        lr=0.001, base_batch=64, epochs=25, schedule="step", lr_steps=(10, 20), fc_lr_mult=5.0, clip_grad=20.0
    )
    cfg.recipe = RecipeConfig(
        source="TSM scripts/finetune_tsm_ucf101_rgb_8f.sh",
        deviations=("GC-TSM fine-tuned from a GC-TSM Kinetics run: the script fine-tunes TSM",),
    )
    return cfg


def gc_tsm_r50_ucf101_ft() -> Config:
    return _finetune("gc_tsm_r50_ucf101_ft", "ucf101")


def gc_tsm_r50_hmdb51_ft() -> Config:
    cfg = _finetune("gc_tsm_r50_hmdb51_ft", "hmdb51")
    cfg.recipe.deviations += ("HMDB51 fine-tuned as the script fine-tunes UCF101",)
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {
    f.__name__: f
    for f in (
        demo,
        demo_tsn,
        gc_tsm_r50_k400_8f,
        gc_tsm_r50_k400_16f,
        gc_tsn_r50_k400_8f,
        tsm_r50_k400_8f,
        gc_tsm_r50_sthv1_8f,
        gc_tsm_r50_sthv2_8f,
        gc_tsm_r50_sthv2_16f,
        ecal_t_tsm_r50_sthv1_8f,
        gc_gst_r50_sthv1_8f,
        gc_tdn_r50_sthv1_8f,
        gc_tsm_r50_jester_8f,
        gc_tsm_r50_diving48_16f,
        tsm_r50_k400_8f_dense,
        tsm_r50_nl_k400_8f_dense,
        tsm_mbv2_k400_8f,
        gc_tsm_r50_ucf101_ft,
        gc_tsm_r50_hmdb51_ft,
    )
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}{_did_you_mean(name, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    return resolve(PRESETS[name]())


PRESETS_TABLE_COLUMNS = (
    "preset",
    "model",
    "dataset",
    "frames",
    "lr",
    "batch per GPU",
    "epochs",
    "schedule",
    "source",
    "deviations",
)


def _source_cell(source: str) -> str:
    """A "GC <path>" / "TSM <path>" source as a link to that file of the release; anything else as is."""
    repo, _, rest = source.partition(" ")
    path, _, note = rest.partition(" ")
    if repo in SOURCE_REPOS and path:
        return f"[{repo} {path}]({SOURCE_REPOS[repo]}/{path})" + (f" {note}" if note else "")
    return source


def _schedule_cell(o: OptimConfig) -> str:
    shape = (
        f"step x{o.lr_decay:g} at {', '.join(f'{s:g}' for s in o.lr_steps)}"
        if o.schedule == "step"
        else o.schedule
    )
    return shape + (f", warm-up {o.warmup_epochs:g}" if o.warmup_epochs else "")


def presets_table() -> str:
    """Every preset's model, data, optimisation and source as a markdown table (docs/models.md holds it)."""
    rows = [PRESETS_TABLE_COLUMNS, ("---",) * len(PRESETS_TABLE_COLUMNS)]
    for name in PRESETS:
        cfg = preset(name)
        d, o = cfg.data, cfg.optim
        frames = f"{d.num_segments}" + (f" x {d.frames_per_segment}" if d.frames_per_segment > 1 else "")
        rows.append(
            (
                f"`{name}`",
                f"`{cfg.model.name}`",
                d.index.split("/")[-2] if "/" in d.index else d.index,
                frames + (f" dense /{d.dense_stride}" if d.sampling == "dense" else ""),
                f"{o.lr:g} per {o.base_batch}",
                str(d.batch_size),
                str(o.epochs),
                _schedule_cell(o),
                _source_cell(cfg.recipe.source),
                "; ".join(cfg.recipe.deviations) or "none",
            )
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


# ------------------------------------------------------------------------------- CLI overrides, (de)serialise

ALIASES = {
    "--resume": "--run.resume",
    "--tune-from": "--run.tune_from",
    "--pretrained": "--model.pretrained",
    "--out": "--run.out",
    "--device": "--run.device",
    "--precision": "--run.precision",
    "--seed": "--run.seed",
    "--epochs": "--optim.epochs",
    "--lr": "--optim.lr",
    "--batch-size": "--data.batch_size",
    "--index": "--data.index",
    "--model": "--model.name",
    "--compile": "--model.compile",
    "--sync-bn": "--model.sync_bn",
    "--max-steps": "--run.max_steps",
}


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def all_options(cfg: Config) -> list[str]:
    return [f"--{section}.{name}" for section, name, _ in fields(cfg)]


def parse_value(option: str, text: str, annotation: Any) -> Any:
    """Convert the command-line text of `option` to its field type (bool, int, float, str, tuple[X, ...],
    Literal[...]: its allowed values are checked by validate)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return (
            parse_value(option, text, type(choices[0]))
            if text not in map(str, choices)
            else (next(c for c in choices if str(c) == text))
        )
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is tuple:
            item = typing.get_args(annotation)[0]
            parts = [p.strip() for p in text.split(",") if p.strip()]  # text items keep inner spaces
            return tuple(item(p) for p in parts)
        if annotation in (int, float, str):
            return annotation(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
            annotation, "comma-separated numbers"
        )
        raise ConfigError(f"{option} expects {kind}, got {text!r}") from None
    raise ConfigError(f"{option}: cannot set a field of type {annotation} from the command line")


def apply_overrides(cfg: Config, args: Sequence[str]) -> Config:
    """Apply `--section.field value` overrides in order; unknown options and bad values raise ConfigError."""
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --optim.lr 0.01")
        name, eq, inline = arg.partition("=")
        negate = name.startswith("--no-")
        if negate:
            name = "--" + name[5:]
        name = ALIASES.get(name, name)
        if name in DERIVED:
            raise ConfigError(f"{name} is not an option: it {DERIVED[name]}")
        if name in MOVED:
            raise ConfigError(
                f"{name} is not an option: the test views are --eval.* settings; use {MOVED[name]}"
            )
        section_name, _, field_name = name[2:].partition(".")
        section = getattr(cfg, section_name, None) if section_name != "preset" else None
        if (
            section is None
            or not dataclasses.is_dataclass(section)
            or field_name not in _field_types(section)
        ):
            raise ConfigError(
                f"unknown option {arg.split('=')[0]}{_did_you_mean(name, all_options(cfg))}; "
                f"run `python train.py --help` for the list"
            )
        annotation = _field_types(section)[field_name]
        if negate or (annotation is bool and not eq and (i + 1 == len(args) or args[i + 1].startswith("--"))):
            if annotation is not bool:
                raise ConfigError(f"{arg} only applies to true/false options; {name} needs a value")
            value = not negate
            i += 1
        else:
            if not eq:
                if i + 1 == len(args):
                    raise ConfigError(f"{name} needs a value")
                inline = args[i + 1]
                i += 1
            value = parse_value(name, inline, annotation)
            i += 1
        setattr(section, field_name, value)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved by to_dict; fields added since keep their defaults, removed ones are ignored."""
    cfg = Config(preset=d.get("preset", "demo"))
    for section in dataclasses.fields(cfg):
        if section.name == "preset" or section.name not in d:
            continue
        obj = getattr(cfg, section.name)
        types = _field_types(obj)
        for key, value in d[section.name].items():
            if key in types:
                setattr(obj, key, tuple(value) if typing.get_origin(types[key]) is tuple else value)
    return resolve(cfg)


def cli_value(value: Any) -> str:
    """A field's value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "''"
    return str(value) if value != "" else "''"


def help_text(cfg: Config, width: int = 110) -> str:
    """Every option by section: its value in `cfg`, its allowed values, and its description."""
    lines = []
    for section in dataclasses.fields(cfg):
        if section.name == "preset":
            continue
        obj, types = getattr(cfg, section.name), _field_types(getattr(cfg, section.name))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(obj):
            if f"--{section.name}.{f.name}" in DERIVED:
                continue
            choices = typing.get_args(types[f.name]) if typing.get_origin(types[f.name]) is Literal else ()
            allowed = f"  ({' | '.join(map(str, choices))})" if choices else ""
            head = f"  --{section.name}.{f.name} {cli_value(getattr(obj, f.name))}{allowed}"
            lines += textwrap.wrap(head, width, subsequent_indent=" " * 8) if len(head) > width else [head]
            lines += textwrap.wrap(
                f.metadata.get("help", ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines)


def split_preset(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(the --preset NAME of argv, demo if none; the other arguments)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--preset" or arg.startswith("--preset="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value or value.startswith("--"):
                raise ConfigError(f"--preset needs a name: one of {', '.join(PRESETS)}")
            del argv[i : i + (1 if "=" in arg else 2)]
            return value, argv
    return "demo", argv


def parse_train_args(argv: Sequence[str]) -> Config:
    """`[--preset NAME] [--section.field VALUE ...]` -> the validated config (preset demo by default)."""
    name, rest = split_preset(argv)
    cfg = apply_overrides(preset(name), rest)
    given = {ALIASES.get(a.split("=")[0], a.split("=")[0]) for a in rest if a.startswith("--")}
    for note in fit_schedule(cfg, given):
        log.warning("%s", note)
    return validate(cfg)


def fit_schedule(cfg: Config, given: set[str]) -> list[str]:
    """A run shorter than its preset's schedule (--optim.epochs 1 for a smoke run) gets one that fits: a
    warm-up no longer than the run warms up for half of it, lr steps past the end are dropped. Returns the
    notes that say so. A warm-up or steps `given` on the command line are the user's own: validate refuses
    them if they do not fit."""
    optim, notes = cfg.optim, []
    if "--optim.warmup_epochs" not in given and optim.warmup_epochs >= optim.epochs:
        notes.append(
            f"--optim.epochs {optim.epochs} is not longer than preset {cfg.preset}'s warm-up of "
            f"{optim.warmup_epochs:g} epoch(s): warming up for {optim.epochs / 2:g} "
            f"(--optim.warmup_epochs to choose)"
        )
        optim.warmup_epochs = optim.epochs / 2
    late = [s for s in optim.lr_steps if s >= optim.epochs]
    if "--optim.lr_steps" not in given and late:
        optim.lr_steps = tuple(s for s in optim.lr_steps if s < optim.epochs)
        notes.append(
            f"--optim.epochs {optim.epochs} ends before preset {cfg.preset}'s lr steps at epoch(s) "
            f"{', '.join(f'{s:g}' for s in late)}: they are dropped (--optim.lr_steps to choose)"
        )
    return notes


# ------------------------------------------------------------------------------------------------ validation


def fields(cfg: Config) -> list[tuple[str, str, Any]]:
    """(section, field, type annotation) of every overridable field."""
    return [
        (section.name, name, annotation)
        for section in dataclasses.fields(cfg)
        if section.name != "preset"
        for name, annotation in _field_types(getattr(cfg, section.name)).items()
        if f"--{section.name}.{name}" not in DERIVED
    ]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_types(cfg: Config) -> None:
    """Literal fields hold one of their values; numbers are finite; counts are not negative."""
    for section, name, annotation in fields(cfg):
        value, option = getattr(getattr(cfg, section), name), f"--{section}.{name}"
        if typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            _check(value in choices, f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")
        elif annotation is float:
            _check(math.isfinite(value), f"{option} must be a finite number, got {value}")
        elif annotation is int:
            _check(value >= 0, f"{option} must be >= 0, got {value}")


def validate(cfg: Config) -> Config:
    """Reject values that cannot work, naming the option and the allowed range; resolve the fields that
    follow from others (resolve)."""
    _check_types(cfg)
    _check_model(cfg.model)
    resolve(cfg)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_run(cfg.run)
    _check_eval(cfg.eval)
    return cfg


def _check_model(model: ModelConfig) -> None:
    known = models.list_models()
    _check(
        model.name in known,
        f"unknown --model.name {model.name!r}{_did_you_mean(model.name, known)}; known: {', '.join(known)}",
    )
    _check(0.0 <= model.dropout < 1.0, f"--model.dropout must be in [0, 1), got {model.dropout}")
    _check(
        min(model.shift_div, model.cdiv, model.ratio) >= 1,
        "--model.shift_div, --model.cdiv and --model.ratio must be >= 1",
    )


def _check_data(data: LoaderConfig) -> None:
    _check(
        data.cache_gb > 0, f"--data.cache_gb must be > 0 (a remote index's shard cache), got {data.cache_gb}"
    )
    _check(
        min(data.num_segments, data.batch_size, data.dali_pipelines) >= 1,
        "--data.num_segments, --data.batch_size and --data.dali_pipelines must be >= 1",
    )
    _check(
        0 < data.crop_size <= data.scale_size,
        f"--data.crop_size must be in (0, --data.scale_size={data.scale_size}], got {data.crop_size}",
    )
    _check(
        len(data.scales) > 0 and all(0 < s <= 1 for s in data.scales),
        f"--data.scales must be comma-separated numbers in (0, 1], got {data.scales}",
    )


def _check_optim(optim: OptimConfig) -> None:
    epochs = optim.epochs
    _check(optim.lr > 0, f"--optim.lr must be > 0, got {optim.lr}")
    _check(min(optim.base_batch, epochs) >= 1, "--optim.base_batch and --optim.epochs must be >= 1")
    _check(0 <= optim.momentum < 1, f"--optim.momentum must be in [0, 1), got {optim.momentum}")
    _check(optim.weight_decay >= 0, f"--optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _check(
        list(optim.lr_steps) == sorted(optim.lr_steps) and all(0 < s < epochs for s in optim.lr_steps),
        f"--optim.lr_steps must be increasing epochs inside (0, --optim.epochs={epochs}), "
        f"got {optim.lr_steps}",
    )
    _check(0 < optim.lr_decay <= 1, f"--optim.lr_decay must be in (0, 1], got {optim.lr_decay}")
    _check(
        0 <= optim.warmup_epochs < epochs,
        f"--optim.warmup_epochs must be in [0, --optim.epochs={epochs}), got {optim.warmup_epochs}",
    )
    _check(0 < optim.warmup_start_factor <= 1, "--optim.warmup_start_factor must be in (0, 1]")
    _check(optim.clip_grad >= 0, f"--optim.clip_grad must be >= 0 (0: off), got {optim.clip_grad}")
    _check(
        optim.gc_lr_mult > 0 and optim.fc_lr_mult > 0, "--optim.gc_lr_mult and --optim.fc_lr_mult must be > 0"
    )
    _check(
        0 <= optim.label_smoothing < 1,
        f"--optim.label_smoothing must be in [0, 1), got {optim.label_smoothing}",
    )


def _check_run(run: RunConfig) -> None:
    _check(
        run.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", run.device) is not None,
        f"--run.device must be auto, cpu, cuda or cuda:N, got {run.device!r}",
    )
    _check(min(run.eval_every, run.log_every) >= 1, "--run.eval_every and --run.log_every must be >= 1")
    _check(bool(run.out), "--run.out must name a run directory")
    _check(
        not (run.resume and run.tune_from),
        "--resume continues a run and --tune-from starts a new one from another run's weights: give one",
    )
    _check(0 <= run.target_top1 <= 1, f"--run.target_top1 must be in [0, 1] (0: off), got {run.target_top1}")
    _check(
        math.isfinite(run.time_budget_min) and run.time_budget_min >= 0,
        f"--run.time_budget_min must be >= 0 minutes (0: no limit), got {run.time_budget_min}",
    )


def _check_eval(views: EvalConfig) -> None:
    _check(min(views.num_clips, views.batch_size) >= 1, "--eval.num_clips and --eval.batch_size must be >= 1")
    _check(
        not (views.twice_sample and views.sampling == "dense"),
        "--eval.twice_sample applies to tsn sampling only",
    )


def main(argv: Sequence[str]) -> int:
    """`python -m config --presets-table`: the table of docs/models.md, from the presets' own fields."""
    if list(argv) != ["--presets-table"]:
        sys.stderr.write("usage: python -m config --presets-table\n")
        return 2
    sys.stdout.write(presets_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
