"""The mutation score per core module from mutmut's results (mutants/*.meta), as markdown on stdout.

    python tests/mutation_report.py            # after `make mutate` (or `mutmut run NAMES...`)
    python tests/mutation_report.py OLD .      # OLD: a copy of an earlier run's folder; mutants run again
                                               # in this one (the survivors, say) take its result

mutmut forgets every result once the tests change; a run limited to the survivors of an earlier full run, with
tests only added since, is combined with that run this way.

Counts only mutants that were run: `not checked` (a run limited to some modules, or stopped) is reported as
such, never as killed or survived. Survivors are listed with their one-line change, to be explained (or
killed with a test) in docs/mutation.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

CORE = [
    "pipeline/sampling.py",
    "models/temporal.py",
    "models/resnet.py",
    "optimisation.py",
    "checkpoints.py",
    "pipeline/shards.py",
    "preprocess/runner.py",
]
# mutmut's exit codes (mutmut/stats.py): 1 and 3 killed, 0 survived, 5 / 33 no test calls the function.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", None: "not checked"}


def module_results(root: Path, module: str) -> dict[str, str]:
    meta = root / "mutants" / f"{module}.meta"
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {
        name: STATUS.get(code, "timeout" if code in (24, -24, 36, 152, 255) else "other")
        for name, code in codes.items()
    }


def changed_line(name: str) -> str:
    """The mutant's changed line (mutmut's diff, '+' side), or '' when mutmut cannot tell."""
    try:
        from mutmut.__main__ import find_mutant, get_diff_for_mutant

        diff = get_diff_for_mutant(name, path=find_mutant(name).path)
    except Exception:  # noqa: BLE001 - the report still lists the mutant
        return ""
    return " / ".join(
        x[1:].strip() for x in diff.splitlines() if x.startswith("+") and not x.startswith("+++")
    )


def merged_results(roots: list[Path], module: str) -> dict[str, str]:
    """Each mutant's result in the last root that ran it."""
    merged: dict[str, str] = {}
    for root in roots:
        for name, status in module_results(root, module).items():
            if status != "not checked" or name not in merged:
                merged[name] = status
    return merged


def main(roots: list[Path]) -> int:
    rows, survivors = [], []
    for module in CORE:
        results = merged_results(roots, module)
        c = Counter(results.values())
        run = c["killed"] + c["survived"] + c["timeout"] + c["no tests"]
        score = f"{(c['killed'] + c['timeout']) / run:.1%}" if run else "not run"
        rows.append(
            f"| {module} | {len(results)} | {run} | {c['killed']} | {c['timeout']} | {c['survived']} | "
            f"{c['no tests']} | {c['not checked']} | {score} |"
        )
        survivors += [(module, n, s) for n, s in sorted(results.items()) if s in ("survived", "no tests")]
    print("| module | mutants | run | killed | timeout | survived | no test calls it | not run | score |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nScore = (killed + timeout) / run; 'no test calls it' counts against the score.\n")
    for _module, name, status in survivors:
        print(f"- `{name}` ({status}): `{changed_line(name)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main([Path(a) for a in sys.argv[1:]] or [Path.cwd()]))
