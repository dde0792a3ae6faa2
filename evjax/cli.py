"""Command-line plumbing shared by the entry points (host side)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from evjax.config import Config, ConfigError, load


class UserError(Exception):
    """A mistake of the user's (bad file, bad option) reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def make_parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH", help="YAML config (default: built-in defaults = configs/default.yaml)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config value; repeatable")
    return parser


def config_from_args(args) -> Config:
    return load(args.config, args.overrides)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, prog: str = "evjax") -> int:
    """Call ``main(argv)``; user errors become one stderr line and exit status 2."""
    try:
        return int(main(argv) or 0)
    except (ConfigError, UserError) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
