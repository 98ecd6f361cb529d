#!/usr/bin/env python
"""Where the time of one `refstorage refs PATH OID` goes, with the referrer index (issue 14 part 4).

    .venv/bin/python bench/bench_refs_index.py PATH OID [--rounds 3]

For an existing database whose referrer index (PATH.referrers) is current
(run `refstorage refs PATH OID` once first), each round times, in this process:

    log_open     tools.common.Log(PATH) and build_index() (the saved .index file, then a
                 scan of what follows it): what every `refs` run pays, index or not
    index_open   referrers.open_referrers: trailer, checks against the data file, block table
    lookup       ReferrerIndex.lookup(OID): the blocks holding OID's pairs
    refs         the whole tools.info.refs(PATH, OID) (all of the above plus the report:
                 OID's own record, its references' states, each referrer's record and class)

The whole command (`refstorage refs`, interpreter start and imports included) is
timed from the shell: `/usr/bin/time -v .venv/bin/refstorage refs PATH OID --json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("oid", help="hex, as `refstorage refs` takes it")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    from refstorage import referrers
    from refstorage.tools.common import Log, parse_oid
    from refstorage.tools.info import refs
    imported = time.perf_counter() - started
    oid = parse_oid(args.oid)
    rounds = []
    for _ in range(args.rounds):
        r: dict[str, float | int | str] = {}
        t0 = time.perf_counter()
        with Log(args.path) as log:
            built = log.build_index()
            t1 = time.perf_counter()
            ri = referrers.open_referrers(referrers.referrers_path(args.path), log.reader,
                                          log.header.file_id, built.end)
            t2 = time.perf_counter()
            if ri is None or ri.pos != built.end:
                raise SystemExit("the referrer index is absent or not current: run `refstorage refs` once")
            found = ri.lookup(oid)
            t3 = time.perf_counter()
            r.update(log_open=t1 - t0, index_open=t2 - t1, lookup=t3 - t2, referrers=len(found),
                     blocks=len(ri.firsts), pairs=ri.npairs)
            ri.close()
        t4 = time.perf_counter()
        report = refs(args.path, oid)
        r["refs"] = time.perf_counter() - t4
        r["method"] = report.method + ": " + report.method_note
        rounds.append(r)
    print(json.dumps({"import_seconds": imported, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
