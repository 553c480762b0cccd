"""`serve`'s restart flags, generated from RestartPolicy (config_flags.py)."""

from __future__ import annotations

import argparse

from splitserve.cli import config_flags
from splitserve.cli.supervisor import RestartPolicy


def add_supervision_args(parser: argparse.ArgumentParser) -> None:
    config_flags.add_flags(parser.add_argument_group("supervision"), RestartPolicy)


def restart_policy_from_args(parser: argparse.ArgumentParser,
                             args: argparse.Namespace) -> RestartPolicy:
    try:
        return RestartPolicy(**config_flags.values(RestartPolicy, args))
    except ValueError as e:
        parser.error(str(e))
