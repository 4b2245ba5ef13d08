"""Registers ``optimum-cli lrpqvit ...`` (the ``lrpqvit`` command line) with optimum's CLI."""

from optimum_lrpqvit_cli import LRPQVitOptimumCommand

REGISTER_COMMANDS = [LRPQVitOptimumCommand]
