"""config.py: presets, CLI overrides, (de)serialisation and the validation messages."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import pytest

import config
from pipeline import LoaderConfig, TestViews, build_loader

REQUIRED_PRESETS = [
    "demo",
    "gc_tsm_r50_k400_8f",
    "gc_tsm_r50_k400_16f",
    "gc_tsn_r50_k400_8f",
    "tsm_r50_k400_8f",
    "gc_tsm_r50_sthv1_8f",
    "gc_tsm_r50_sthv2_8f",
    "gc_tsm_r50_sthv2_16f",
    "ecal_t_tsm_r50_sthv1_8f",
    "gc_tsm_r50_diving48_16f",
    "gc_tsm_r50_jester_8f",
    "tsm_r50_k400_8f_dense",
    "gc_tsm_r50_ucf101_ft",
    "gc_tsm_r50_hmdb51_ft",
    "gc_gst_r50_sthv1_8f",
    "gc_tdn_r50_sthv1_8f",
]


def test_gst_tdn_presets_follow_the_gc_scripts():
    gst = config.preset("gc_gst_r50_sthv1_8f")
    assert (gst.model.name, gst.model.gc_loop, gst.optim.lr, gst.optim.base_batch) == (
        "gc_gst_r50",
        True,
        0.01,
        32,
    )
    assert (gst.eval.num_clips, gst.eval.twice_sample, gst.eval.full_res, gst.data.flip) == (
        2,
        True,
        True,
        False,
    )
    tdn = config.preset("gc_tdn_r50_sthv1_8f")
    assert (tdn.data.frames_per_segment, tdn.data.clip_length, tdn.optim.lr_steps) == (5, 40, (30, 45, 55))
    assert (tdn.optim.weight_decay, tdn.optim.epochs, tdn.optim.gc_lr_mult) == (5e-4, 60, 5.0)


SWITCHES = [("gc_gst_r50_sthv1_8f", "tdn_r50"), ("gc_tdn_r50_sthv1_8f", "tsm_r50")]


def test_frames_per_segment_follows_from_the_model_and_is_not_an_option():
    tdn, gst = config.preset("gc_tdn_r50_sthv1_8f"), config.preset("gc_gst_r50_sthv1_8f")
    assert (tdn.data.frames_per_segment, gst.data.frames_per_segment) == (5, 1)
    switched = [
        config.validate(config.apply_overrides(config.preset(p), ["--model.name", m])) for p, m in SWITCHES
    ]
    assert [cfg.data.frames_per_segment for cfg in switched] == [5, 1]
    with pytest.raises(
        config.ConfigError, match="--data.frames_per_segment is not an option: it follows from"
    ):
        config.apply_overrides(tdn, ["--data.frames_per_segment", "1"])
    assert "frames_per_segment" not in config.help_text(tdn) and "--eval.num_clips" in config.help_text(tdn)
    # a saved config (run/config.json, a checkpoint's) holds the field: it loads, and the model decides
    saved = config.to_dict(tdn)
    assert saved["data"]["frames_per_segment"] == 5 and config.from_dict(saved).data.frames_per_segment == 5
    saved["data"]["frames_per_segment"] = 1  # written by hand, or by a version that let it be set
    assert config.from_dict(saved).data.frames_per_segment == 5


@pytest.mark.parametrize("view", ["num_clips", "num_crops", "twice_sample"])
def test_each_test_view_has_one_option_under_eval(view):
    with pytest.raises(config.ConfigError, match=f"--data.{view} is not an option: .* use --eval.{view}"):
        config.apply_overrides(config.demo(), [f"--data.{view}", "1"])
    assert f"--data.{view}" not in config.all_options(
        config.demo()
    ) and f"--eval.{view}" in config.all_options(config.demo())


def test_the_test_views_are_defined_once():
    """num_clips, num_crops and twice_sample live in pipeline.TestViews only: EvalConfig is one (the
    --eval.* options), the loader's config has none of them, and a loader takes them as an argument."""
    views = {f.name for f in dataclasses.fields(TestViews)}
    assert views == {"num_clips", "num_crops", "twice_sample"}
    assert not views & {f.name for f in dataclasses.fields(LoaderConfig)}
    assert issubclass(config.EvalConfig, TestViews) and isinstance(config.demo().eval, TestViews)
    own = set(vars(config.EvalConfig)["__annotations__"])  # the fields EvalConfig itself declares
    assert not views & own and views <= {f.name for f in dataclasses.fields(config.EvalConfig)}
    assert "views" in inspect.signature(build_loader).parameters


def test_a_saved_config_with_the_loaders_old_view_fields_loads():
    """config.json and checkpoints written while LoaderConfig held the views (data.num_clips, ...) load:
    the old loader fields are ignored, the views come from their eval section as they always did."""
    saved = json.loads(json.dumps(config.to_dict(config.preset("gc_tsm_r50_sthv1_8f"))))
    assert "num_clips" not in saved["data"] and saved["eval"]["num_clips"] == 2
    saved["data"].update(num_clips=5, num_crops=10, twice_sample=False)  # the old layout
    cfg = config.validate(config.from_dict(saved))
    assert (cfg.eval.num_clips, cfg.eval.num_crops, cfg.eval.twice_sample) == (2, 1, True)
    assert not hasattr(cfg.data, "num_clips") and cfg == config.preset("gc_tsm_r50_sthv1_8f")


@pytest.mark.parametrize(
    "name, flip, sampling, frames, views",
    [
        ("gc_tsm_r50_k400_8f", True, "tsn", 8, (10, 1)),
        ("gc_tsm_r50_sthv1_8f", False, "tsn", 8, (2, 1)),  # labels name directions: no flip
        ("gc_tsm_r50_sthv2_16f", False, "tsn", 16, (2, 1)),
        ("gc_tsm_r50_jester_8f", False, "tsn", 8, (2, 1)),  # "swiping left" / "swiping right"
        ("gc_tsm_r50_diving48_16f", True, "tsn", 16, (1, 1)),
        ("tsm_r50_k400_8f_dense", True, "dense", 8, (10, 3)),  # the non-local test protocol
        ("gc_tsm_r50_hmdb51_ft", True, "tsn", 8, (10, 1)),
    ],
)
def test_dataset_presets_follow_their_protocols(name, flip, sampling, frames, views):
    cfg = config.preset(name)
    assert (cfg.data.flip, cfg.data.sampling, cfg.data.num_segments) == (flip, sampling, frames)
    assert (cfg.eval.num_clips, cfg.eval.num_crops) == views
    assert name.startswith(("tsm_", "gc_tsm_r50_k400")) or "_ft" in name or cfg.optim.gc_lr_mult == 5.0


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_presets_are_valid_and_round_trip_through_json(name):
    cfg = config.validate(config.preset(name))
    assert cfg.preset == name
    assert config.from_dict(json.loads(json.dumps(config.to_dict(cfg)))) == cfg


def test_preset_facts_follow_the_reference_recipes():
    k400 = config.preset("gc_tsm_r50_k400_8f")
    assert (k400.model.name, k400.data.num_segments, k400.optim.lr, k400.optim.base_batch) == (
        "gc_tsm_r50",
        8,
        0.02,
        128,
    )
    assert k400.optim.lr_steps == (20, 40) and k400.optim.epochs == 50 and k400.optim.clip_grad == 20
    assert config.preset("gc_tsm_r50_k400_16f").data.num_segments == 16
    assert config.preset("gc_tsn_r50_k400_8f").model.name == "gc_tsn_r50"
    assert config.preset("tsm_r50_k400_8f").model.name == "tsm_r50"
    sth = config.preset("gc_tsm_r50_sthv2_8f")
    # lr 0.01 for 32 clips: the GC repository's train_tsm.sh (--lr 0.01 --batch-size 32 under DataParallel, no
    # scaling in main_tsm.py), not the TSM release's 0.01 for 64 (half the lr per clip)
    assert sth.data.flip is False and (sth.optim.lr, sth.optim.base_batch) == (0.01, 32)
    ucf = config.preset("gc_tsm_r50_ucf101_ft")
    assert ucf.model.dropout == 0.8 and ucf.optim.lr == 0.001 and ucf.optim.fc_lr_mult == 5
    demo = config.preset("demo")
    assert demo.model.name == "gc_tsm_mini" and demo.data.flip is False and demo.data.num_segments == 8


def test_overrides_parse_every_kind_of_field():
    cfg = config.apply_overrides(
        config.demo(),
        [
            "--optim.lr",
            "0.01",
            "--data.batch_size=16",
            "--data.scales",
            "1,0.75",
            "--resume",
            "--no-model.compile",
            "--run.tensorboard",
            "false",
            "--tune-from=",
            "--model",
            "tsn_mini",
            "--optim.lr_steps=2,4",
        ],
    )
    assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 16 and cfg.data.scales == (1.0, 0.75)
    assert cfg.run.resume is True and cfg.model.compile is False and cfg.run.tensorboard is False
    assert cfg.model.name == "tsn_mini" and cfg.optim.lr_steps == (2.0, 4.0) and cfg.run.tune_from == ""
    assert config.apply_overrides(config.demo(), ["--no-compile"]).model.compile is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lrr", "0.1"], "unknown option --optim.lrr (did you mean '--optim.lr'?)"),
        (["--optim.lr", "fast"], "--optim.lr expects a number, got 'fast'"),
        (["--data.batch_size", "2.5"], "--data.batch_size expects an integer"),
        (["--run.resume", "maybe"], "--run.resume expects true or false"),
        (["--optim.lr"], "--optim.lr needs a value"),
        (["--no-optim.lr"], "only applies to true/false options"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_options_are_rejected_by_name(args, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.apply_overrides(config.demo(), args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lr", "-1"], "--optim.lr must be > 0"),
        (["--optim.schedule", "poly"], "--optim.schedule must be one of step, cosine, got 'poly'"),
        (["--data.crop_size", "80"], "--data.crop_size must be in (0, --data.scale_size=64]"),
        (["--optim.lr_steps", "5,2", "--optim.schedule", "step"], "--optim.lr_steps must be increasing"),
        (["--optim.lr_steps", "17"], "inside (0, --optim.epochs=16)"),
        (["--model.dropout", "1"], "--model.dropout must be in [0, 1)"),
        (["--run.precision", "fp8"], "--run.precision must be one of auto, fp32, bf16, fp16"),
        (["--eval.num_crops", "5"], "--eval.num_crops must be one of 1, 3, 10"),
        (["--run.device", "tpu"], "--run.device must be auto, cpu, cuda or cuda:N"),
        (["--resume", "--tune-from", "x.pt"], "give one"),
        (["--optim.warmup_epochs", "16"], "--optim.warmup_epochs must be in [0, --optim.epochs=16)"),
        (["--optim.lr", "inf"], "--optim.lr must be a finite number, got inf"),
        (["--optim.momentum", "nan"], "--optim.momentum must be a finite number"),
        (["--data.workers", "-1"], "--data.workers must be >= 0, got -1"),
        (["--data.backend", "opencv"], "--data.backend must be one of auto, dali-gpu, dali-cpu, torch"),
        (["--model.shift_place", "middle"], "--model.shift_place must be one of blockres, block"),
        (["--model.name", "gc_tsm_r5"], "unknown --model.name 'gc_tsm_r5' (did you mean 'gc_tsm_r50'?)"),
        (["--model.ratio", "0"], "--model.ratio must be >= 1"),
    ],
)
def test_bad_values_are_rejected_with_the_allowed_range(args, message):
    cfg = config.apply_overrides(config.demo(), args)
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    assert message in str(err.value)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(config.ConfigError, match="did you mean 'gc_tsm_r50_k400_8f'"):
        config.preset("gc_tsm_r50_k400_8")


def test_from_dict_ignores_removed_fields_and_keeps_new_defaults():
    d = config.to_dict(config.demo())
    d["optim"]["no_longer_exists"] = 1
    del d["run"]["log_every"]
    cfg = config.from_dict(d)
    assert cfg.run.log_every == config.RunConfig().log_every and cfg.optim.lr == config.demo().optim.lr


def test_literal_fields_are_the_one_list_of_allowed_values():
    cfg = config.apply_overrides(
        config.demo(), ["--eval.num_crops", "3", "--model.ratio", "8", "--data.dali_pipelines", "2"]
    )
    assert cfg.eval.num_crops == 3 and isinstance(cfg.eval.num_crops, int)
    assert cfg.model.ratio == 8 and cfg.model.build_kwargs()["ratio"] == 8
    assert cfg.data.dali_pipelines == 2
    help_text = config.help_text(config.demo())
    assert "--run.precision" in help_text and "(auto | fp32 | bf16 | fp16)" in help_text
    assert "(1 | 3 | 10)" in help_text


def test_every_build_model_option_is_reachable_from_the_command_line():
    import inspect

    import models

    options = {
        p for p in inspect.signature(models.build_model).parameters if p not in ("name", "num_classes")
    }
    reachable = set(config.ModelConfig().build_kwargs()) | {
        "num_segments"
    }  # num_segments: --data.num_segments
    assert options == reachable


def test_parse_train_args_takes_the_preset_anywhere():
    cfg = config.parse_train_args(["--optim.lr", "0.5", "--preset", "demo_tsn"])
    assert cfg.preset == "demo_tsn" and cfg.model.name == "tsn_mini" and cfg.optim.lr == 0.5
    assert config.parse_train_args(["--preset=gc_tsm_r50_k400_8f"]).model.name == "gc_tsm_r50"
    for argv in (["--preset"], ["--preset", "--optim.lr", "1"]):
        with pytest.raises(config.ConfigError, match="--preset needs a name"):
            config.parse_train_args(argv)


# The GC repository's scripts (haoyanbin918/Group-Contextualization b99be50), as each one's lines say:
# train_tsm.sh / train_gst.sh: --lr 0.01 --wd 1e-4 --lr_steps 20 40 --epochs 50 --batch-size 32 --dropout 0.5
# --gd 20 --ef_lr5 (one process, DataParallel: 32 clips a step); train_tdn.sh: --nproc_per_node=8 --lr 0.01
# --lr_steps 30 45 55 --epochs 60 --batch-size 8 --wd 5e-4 --dropout 0.5 --gd 20 (8 x 8 = 64 clips a step).
GC_SCRIPTS = {
    "GC train_tsm.sh": dict(lr=0.01, base_batch=32, weight_decay=1e-4, lr_steps=(20, 40), epochs=50),
    "GC train_gst.sh": dict(lr=0.01, base_batch=32, weight_decay=1e-4, lr_steps=(20, 40), epochs=50),
    "GC train_tdn.sh": dict(lr=0.01, base_batch=64, weight_decay=5e-4, lr_steps=(30, 45, 55), epochs=60),
}


@pytest.mark.parametrize("name", [n for n in config.PRESETS if config.preset(n).recipe.source in GC_SCRIPTS])
def test_presets_that_follow_a_gc_script_take_its_numbers(name):
    cfg = config.preset(name)
    script = GC_SCRIPTS[cfg.recipe.source]
    assert {key: getattr(cfg.optim, key) for key in script} == script
    assert (cfg.optim.gc_lr_mult, cfg.optim.clip_grad, cfg.model.dropout, cfg.model.partial_bn) == (
        5.0,
        20,
        0.5,
        False,
    )


def test_every_gc_something_preset_follows_a_gc_script():
    gc_something = [
        n for n in config.PRESETS if n.startswith(("gc_", "ecal_")) and "_k400" not in n and "_ft" not in n
    ]
    assert len(gc_something) == 8
    assert all(config.preset(n).recipe.source in GC_SCRIPTS for n in gc_something)


def test_every_preset_names_its_source_and_the_run_saves_it():
    for name in config.PRESETS:
        recipe = config.preset(name).recipe
        assert recipe.source and all(recipe.deviations), name
    cfg = config.preset("gc_tdn_r50_sthv1_8f")
    saved = json.loads(json.dumps(config.to_dict(cfg)))
    assert saved["recipe"]["source"] == "GC train_tdn.sh" and config.from_dict(saved).recipe == cfg.recipe
    assert (
        config.from_dict({k: v for k, v in saved.items() if k != "recipe"}).recipe == config.RecipeConfig()
    )  # older runs


def test_text_tuples_keep_their_inner_spaces_on_the_command_line():
    cfg = config.apply_overrides(
        config.demo(), ["--recipe.deviations", "batch 4 a GPU, no flip", "--data.scales", "1, 0.875"]
    )
    assert cfg.recipe.deviations == ("batch 4 a GPU", "no flip") and cfg.data.scales == (1.0, 0.875)
