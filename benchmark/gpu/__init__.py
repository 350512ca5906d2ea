"""The GPU run kit: everything one short lease of a GPU host with no network needs, prepared and rehearsed
on a CPU (docs/benchmark.md, "The GPU run kit").

- prepare.py (here, with network): wheels for the host's Python, H.264 shards, the bundle cut into parts
  that fit one transfer each, a manifest with sha256, and the exact sequence of host commands.
- suite.sh / suite.py (there): receive and check the parts, install, run the steps under their budgets.
- steps.py and its helpers (decode.py, loader_sweep.py, resume.py): what each step measures.
- kit.py: the transport (split, checksums, join, install); standard library only.
"""
