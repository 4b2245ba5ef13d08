"""Registers ``optimum-cli lrpqvit ...`` (the ``lrpqvit`` command line) with optimum's CLI."""

from optimum_lrpqvit.cli import LRPQVitOptimumCommand

REGISTER_COMMANDS = [LRPQVitOptimumCommand]
