"""Benchmarks as code: `python -m benchmark <preprocess|loader|model|train|all> [--quick]`.

Each benchmark is a module benchmark/<what>.py exposing `main(args) -> int | None` (and optionally
`add_arguments(parser)` for its own options); benchmark/common.py holds the shared timing and result-file
helpers.
"""
