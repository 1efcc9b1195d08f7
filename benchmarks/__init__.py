"""Benchmarks: fedlearn against its peer (Flower) and the machine's physical limits.

A regular package (not a namespace one) so that ``benchmarks`` is this folder even where a
wheel installs a top-level package of the same name (Opacus 1.6 does): Python prefers a
regular package found anywhere on ``sys.path`` to a namespace package found earlier.
"""
