"""shardformat: the rules preprocess/ and pipeline/ share, and the rule that the two never import each other
(what they share lives in shardformat.py and dirlock.py)."""

from __future__ import annotations

import ast
from fractions import Fraction

import pytest
from conftest import ROOT

import shardformat
from pipeline import shards
from preprocess import runner


def imported_packages(package: str) -> set[str]:
    """The top-level names every module of `package` imports (absolute imports; relative ones stay inside)."""
    names = set()
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_preprocess_and_pipeline_never_import_each_other():
    assert "preprocess" not in imported_packages("pipeline")
    assert "pipeline" not in imported_packages("preprocess")
    assert {"shardformat", "dirlock"} <= imported_packages("pipeline") & imported_packages("preprocess")


def test_one_format_for_the_writer_and_the_reader():
    assert runner.FORMAT is shards.FORMAT is shardformat.FORMAT


@pytest.mark.parametrize("x, expected", [(0.4, 2), (1, 2), (3, 4), (4.9, 4), (5.1, 6), (227.6, 228)])
def test_even(x, expected):
    assert shardformat.even(x) == expected


@pytest.mark.parametrize(
    "width, height, sar, rotation, short_side, size, expected",
    [
        (640, 480, Fraction(1), 0, 256, None, (342, 256)),
        (640, 480, Fraction(1), 90, 256, None, (256, 342)),  # a quarter turn swaps the sides
        (720, 480, Fraction(32, 27), 0, None, None, (854, 480)),  # anamorphic: square pixels
        (175, 143, Fraction(1), 180, None, None, (176, 144)),  # kept, made even
        (1920, 1080, Fraction(1), 0, 256, (320, 240), (320, 240)),  # a fixed size wins
    ],
)
def test_frame_size(width, height, sar, rotation, short_side, size, expected):
    assert shardformat.frame_size(width, height, sar, rotation, short_side, size) == expected
