"""Benchmarks shipped with the package: ``arrowinfer bench`` (:mod:`.transports`) and the
harness the scripts in the source tree's ``benchmarks/`` share.

Nothing here runs a file by path, so ``arrowinfer bench`` works from an installed package as
from a clone.
"""
