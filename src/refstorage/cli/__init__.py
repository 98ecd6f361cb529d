"""The `refstorage` command (also `python -m refstorage`).

Each group of subcommands lives in its own module of this package and
registers itself on `main`; this module only assembles them.  The options
every subcommand shares (-v, -q), the parsers of its arguments and its exit
statuses are in `common`.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from .common import EXIT_PROBLEM, describe, shared_params, verbosity


class RefstorageGroup(click.Group):
    """Adds -v/-q to every subcommand and turns an unexpected error into one line (exit 1).

    With -vv the traceback is printed too."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        have = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        cmd.params.extend(p for p in shared_params() if not have.intersection(p.opts))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit,
                KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # the reader of stdout went away (refstorage dump ... | head): stop quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            ctx.exit(EXIT_PROBLEM)
        except Exception as exc:
            if verbosity() >= 2:
                traceback.print_exc()
            hint = "" if verbosity() >= 2 else " (run with -vv for the details)"
            err = click.ClickException(f"unexpected error: {describe(exc)}{hint}")
            err.exit_code = EXIT_PROBLEM
            raise err from exc


EPILOG = """\b
Exit status: 0 when all went well; 1 when a problem was found in the data
(damage, a dangling reference, a missing object) or the command could not
run (a missing, unreadable or foreign file, a destination that cannot be
written, an unreachable server); 2 for a bad command line (an unknown
option, a malformed oid, time or count).

\b
Vocabulary shared by the subcommands:
  PATH         an existing refstorage file (never created, except by serve --create)
  OID          hex (0x1a, 1a, 000000000000001a) or decimal (26)
  WHEN         a tid (16 hex digits) or an ISO 8601 time (2024-05-01T12:30), UTC unless a zone is given
  --days DAYS  the point in time DAYS days ago (pack, info)
  -n N         how many (tail, history)
  --json       the result as JSON on stdout
  -v, -q       more logging; no progress bar (before or after the subcommand)
"""


@click.group(cls=RefstorageGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EPILOG)
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug output and tracebacks).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(package_name="refstorage")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Tools for refstorage databases (files written by refstorage.FileStorage).

    Progress bars go to stderr (on a terminal), results to stdout.
    """
    from .common import QUIET_KEY, VERBOSE_KEY
    ctx.meta[VERBOSE_KEY] = ctx.meta.get(VERBOSE_KEY, 0) + verbose
    if quiet:
        ctx.meta[QUIET_KEY] = True
    level = logging.WARNING - 10 * min(ctx.meta[VERBOSE_KEY], 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _load_commands() -> None:
    # each module registers its commands on `main` when imported
    from . import convert, pack, replicate, serve, tools, webui  # noqa: F401


_load_commands()
