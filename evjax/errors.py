"""The two kinds of mistake a user can make, each reported as one line with exit status 2.

Kept apart from ``cli.py`` so that host-side modules (``checkpoint.py``, the
data package) can raise them without importing the command-line plumbing.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


class UserError(Exception):
    """A mistake of the user's (bad file, bad option, missing run) reported in one line, exit status 2."""
