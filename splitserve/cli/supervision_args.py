"""`serve`'s restart flags, with defaults read from RestartPolicy."""

from __future__ import annotations

import argparse

from splitserve.cli.supervisor import RestartPolicy


def add_supervision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("supervision")
    policy = RestartPolicy()
    group.add_argument("--max-restarts", type=int, default=policy.max_restarts, metavar="N",
                       help="restarts of one crashed child (worker or frontend) allowed within "
                            "--restart-window; one more exit stops serve with an error; 0 never "
                            "restarts (default: %(default)s)")
    group.add_argument("--restart-window", type=float, default=policy.restart_window_s,
                       metavar="SECONDS", help="the window --max-restarts counts in "
                                               "(default: %(default)s)")


def restart_policy_from_args(parser: argparse.ArgumentParser,
                             args: argparse.Namespace) -> RestartPolicy:
    try:
        return RestartPolicy(max_restarts=args.max_restarts, restart_window_s=args.restart_window)
    except ValueError as e:
        parser.error(str(e))
