"""The image's Python requirements, read from pyproject.toml so that the two cannot disagree.

    python docker/requirements.py pyproject.toml --extra imagenet --exclude torch,torchvision > reqs.txt
    python docker/requirements.py pyproject.toml --extra imagenet --check   # installed versions == pins?

Prints [project].dependencies plus the named optional groups, one per line. `--check` instead compares each
pin with the installed distribution and exits 1 listing the ones that differ (a local version label such as
+cu130 is ignored: torch==2.13.0 is satisfied by 2.13.0+cu130). Standard library only: it runs before anything
else is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;,]+)\s*$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        groups = project.get("optional-dependencies", {})
        if extra not in groups:
            raise SystemExit(
                f"{pyproject}: no optional-dependencies group {extra!r} (groups: {', '.join(groups)})"
            )
        reqs += groups[extra]
    return reqs


def pins(reqs: list[str]) -> dict[str, str]:
    """{normalised name: version} for every exact pin; anything else is an error: the image must be exact."""
    found = {}
    for req in reqs:
        match = PIN.match(req)
        if not match:
            raise SystemExit(
                f"requirement {req!r} is not an exact pin (name==version): pin it in pyproject.toml"
            )
        found[normalise(match[1])] = match[2]
    return found


def mismatches(expected: dict[str, str]) -> list[str]:
    problems = []
    for name, version in expected.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: pinned {version}, not installed")
            continue
        if installed.split("+")[0] != version:
            problems.append(f"{name}: pinned {version}, installed {installed}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="optional-dependencies group to include")
    parser.add_argument("--exclude", default="", help="comma-separated names to leave out (installed apart)")
    parser.add_argument("--check", action="store_true", help="compare the pins with the installed versions")
    args = parser.parse_args(argv)

    reqs = requirements(args.pyproject, args.extra)
    expected = pins(reqs)
    if args.check:
        problems = mismatches(expected)
        for problem in problems:
            print(f"version mismatch: {problem}", file=sys.stderr)
        return 1 if problems else 0
    excluded = {normalise(n) for n in args.exclude.split(",") if n}
    print("\n".join(r for r in reqs if normalise(PIN.match(r)[1]) not in excluded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
