"""The `refstorage` command (also `python -m refstorage`).

Each group of subcommands lives in its own module of this package and
registers itself on `main`; this module only assembles them.
"""

from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug output).")
@click.version_option(package_name="refstorage")
def main(verbose: int) -> None:
    """Tools for refstorage databases (files written by refstorage.FileStorage)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _load_commands() -> None:
    # each module registers its commands on `main` when imported
    from . import convert, pack, serve, tools, webui  # noqa: F401


_load_commands()
