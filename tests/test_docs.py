"""The docs quote the code: error messages, defaults and measured bounds are read back from the code (or from
the docs' own tables) here, so a change to one without the other fails."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

import config as C
from preprocess.__main__ import build_parser
from preprocess.ffmpeg_args import EncodeSettings

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}


def quoted_config_errors() -> list[str]:
    """The config errors README quotes in its One config section, after 'naming the option and the allowed
    values'."""
    sentence = README.split("naming the option and the allowed values", 1)[1].split(".\n", 1)[0]
    return re.findall(r"`([^`]+)`", sentence)


def test_readme_quotes_config_errors_as_the_code_words_them():
    quotes = quoted_config_errors()
    assert len(quotes) >= 2
    for quote in quotes:
        option = re.search(r"--[a-z_]+\.[a-z_]+", quote)[0]
        value = re.search(r"got '([^']*)'", quote)
        with pytest.raises(C.ConfigError) as err:
            C.parse_train_args([option, value[1] if value else "1"])
        assert quote in str(err.value), f"README quotes {quote!r}; the code says {str(err.value)!r}"


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
    assert f"max abs diff < {stated} of the largest logit" in README
