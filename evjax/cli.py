"""Command-line plumbing shared by the entry points (host side)."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Sequence

from evjax.config import Config, load
from evjax.errors import ConfigError, UserError

__all__ = ["ArgumentParser", "ConfigError", "UserError", "config_from_args", "entry_point", "make_parser", "run"]


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


def entry_point(prog: str) -> Callable:
    """Decorate ``main(argv)`` so that it reports user errors through ``run`` however it is called.

    ``python -m evjax.X``, the console scripts of ``pyproject.toml`` (which call
    ``main()`` directly) and tests calling ``main(argv)`` all get one stderr
    line and exit status 2 for a bad config, option or file.
    """

    def decorate(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(main)
        def checked_main(argv: Sequence[str] | None = None) -> int:
            return run(main, argv, prog)

        return checked_main

    return decorate
