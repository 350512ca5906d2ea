"""The docs quote the code: error messages, defaults and measured bounds are read back from the code (or from
the docs' own tables) here, so a change to one without the other fails."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT

import config
from preprocess.__main__ import build_parser
from preprocess.ffmpeg_args import EncodeSettings

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}


def quoted_config_errors() -> list[str]:
    """The config errors docs/train.md quotes in its One config section, after 'naming the option and the
    allowed values'."""
    sentence = DOCS["train.md"].split("naming the option and the allowed values", 1)[1].split(".\n", 1)[0]
    return re.findall(r"`([^`]+)`", sentence)


def test_train_doc_quotes_config_errors_as_the_code_words_them():
    quotes = quoted_config_errors()
    assert len(quotes) >= 2
    for quote in quotes:
        option = re.search(r"--[a-z_]+\.[a-z_]+", quote)[0]
        value = re.search(r"got '([^']*)'", quote)
        with pytest.raises(config.ConfigError) as err:
            config.parse_train_args([option, value[1] if value else "1"])
        assert quote in str(err.value), f"docs/train.md quotes {quote!r}; the code says {str(err.value)!r}"


def test_preprocess_doc_quotes_the_default_h264_settings():
    doc = DOCS["preprocess.md"]
    defaults = EncodeSettings()
    preset, crf, g, keyint = re.search(r"-preset (\S+) -crf (\d+)\s+-g (\d+) -keyint_min (\d+)", doc).groups()
    assert (preset, int(crf), int(g), int(keyint)) == (
        defaults.preset,
        defaults.crf,
        defaults.gop,
        defaults.gop,
    )
    cli = build_parser().parse_args(["kinetics", "--csv", "a.csv", "--videos", "v"])
    assert (cli.gop, cli.crf, cli.preset) == (defaults.gop, defaults.crf, defaults.preset)
    stated = re.findall(r"--gop[`,]* \(?default (\d+)", doc) + re.findall(r"default `--gop (\d+)`", doc)
    assert len(stated) >= 3 and set(stated) == {str(defaults.gop)}


def test_export_doc_bound_holds_for_its_own_table():
    doc = DOCS["inference.md"]
    cells = re.findall(r"(\d\.\de[-+]\d\d) \(([\d.e+]+)\)", doc.split("## Online mode")[0])
    ratios = [float(diff) / float(largest) for diff, largest in cells]
    assert len(ratios) >= 10
    stated = re.search(r"Every difference is below (\S+) of the largest logit", doc)[1]
    bound = float(stated)
    assert max(ratios) < bound, f"the table's worst ratio {max(ratios):.2g} is not below the stated {bound}"
    assert max(ratios) > bound / 10  # the stated bound is the table's, not a loose one
    assert (
        f"max abs diff < {stated} of the largest logit" in doc.split("## Export to ONNX")[0]
    )  # the overview


PRESETS_TABLE = re.compile(r"<!-- presets table: python -m config --presets-table -->\n(.*?)<!-- end", re.S)


def test_models_doc_holds_the_presets_table_the_presets_generate():
    """docs/models.md's table is `python -m config --presets-table`: regenerate it after changing a preset."""
    held = PRESETS_TABLE.search(DOCS["models.md"])
    assert held, "docs/models.md lost its presets table markers"
    assert held[1] == config.presets_table(), (
        "docs/models.md's presets table is stale: python -m config --presets-table"
    )
    rows = [line for line in held[1].splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `(\w+)`", row)[1] for row in rows] == list(config.PRESETS)


def test_the_presets_table_command_prints_the_table_and_refuses_other_arguments():
    done = subprocess.run(
        [sys.executable, "-m", "config", "--presets-table"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == config.presets_table()
    bad = subprocess.run(
        [sys.executable, "-m", "config", "--table"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "usage: python -m config --presets-table" in bad.stderr and not bad.stdout


ALL_DOCS = "\n".join([README, *DOCS.values()])
# What the docs name as a preset or a benchmark: `--preset NAME`, `python -m benchmark NAME`, and the first
# cell of a table row in a docs table of presets / benchmarks.
NAMED_PRESETS = re.compile(r"--preset[ =]`?([a-z][a-z0-9_]*)")
NAMED_BENCHMARKS = re.compile(r"python -m benchmark ([a-z_]+)")
# ... and any `name` in backticks shaped like a preset's name (frames or fine-tuning at its end).
PRESET_SHAPED = re.compile(r"`([a-z][a-z0-9_]*_(?:\d+f|\d+f_dense|ft))`")


def test_every_preset_and_benchmark_is_in_the_docs_and_the_docs_name_no_other():
    from benchmark.__main__ import BENCHMARKS, LONG_BENCHMARKS

    benchmarks = {*BENCHMARKS, *LONG_BENCHMARKS}
    for name in config.PRESETS:
        assert f"`{name}`" in ALL_DOCS, (
            f"preset {name} is in no doc (docs/models.md's table: python -m config)"
        )
    bench_doc = DOCS["benchmark.md"]
    table = {m for m in re.findall(r"^\| `([a-z_]+)`", bench_doc.split("## What each measures")[1], re.M)}
    assert benchmarks <= table, f"docs/benchmark.md's table lacks {sorted(benchmarks - table)}"
    named_presets = set(NAMED_PRESETS.findall(ALL_DOCS)) - {"NAME"} | set(PRESET_SHAPED.findall(ALL_DOCS))
    named_benchmarks = set(NAMED_BENCHMARKS.findall(ALL_DOCS)) - {"all"}
    assert (
        len(named_presets) >= 3 and len(named_benchmarks) >= 5
    )  # the patterns still match the docs' commands
    assert named_presets <= set(config.PRESETS), (
        f"the docs name presets that do not exist: {named_presets - set(config.PRESETS)}"
    )
    gone = named_benchmarks - benchmarks
    assert not gone, f"the docs name benchmarks that do not exist: {sorted(gone)}"
    preset_rows = {
        m for m in re.findall(r"^\| `([a-z0-9_]+)`", DOCS["models.md"].split("## Presets")[1], re.M)
    }
    assert preset_rows == set(config.PRESETS)
    listed = re.findall(r"one benchmark: ([a-z_ |,]+)", ALL_DOCS)
    assert listed and all(set(re.split(r"[ |,]+", x.strip(" |,"))) <= benchmarks for x in listed)
