#!/bin/bash
# The referrer index figures of docs/benchmarks.md ("Referrer index (part 4)"):
#   bench/measure_refs_index.sh DIR N   (DIR holds Data.rfs and build.out from
#   bench_scale.py --child build ["rs", "DIR/Data.rfs", N]; results in DIR/measure.log)
cd "$(dirname "$0")/.."
D=${1:-/work/refidx-10m}
P=$D/Data.rfs
LIVE=$(grep '^RESULT ' $D/build.out | sed 's/^RESULT //' | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["live_oid"])')
echo "live $LIVE git $(git rev-parse --short HEAD) $(date -u)" > $D/measure.log
ls -l $P $P.index >> $D/measure.log
uptime >> $D/measure.log
t() { name=$1; shift; echo "== $name $(date -u +%T) $*" >> $D/measure.log; /usr/bin/time -v "$@" > $D/$name.json 2> $D/$name.time; grep -E "Elapsed|Maximum resident|User time|System time" $D/$name.time >> $D/measure.log; grep -o '"method[^,]*' $D/$name.json >> $D/measure.log; uptime >> $D/measure.log; }
t scan .venv/bin/refstorage refs $P $LIVE --scan --json
t build .venv/bin/refstorage refs $P $LIVE --json
ls -l $P.referrers >> $D/measure.log
t q1 .venv/bin/refstorage refs $P $LIVE --json
t q2 .venv/bin/refstorage refs $P $LIVE --json
t q3 .venv/bin/refstorage refs $P $LIVE --json
.venv/bin/python bench/bench_refs_index.py $P $LIVE --rounds 3 > $D/steps.json 2>&1
echo "== append $(date -u +%T)" >> $D/measure.log
PYTHONPATH=src .venv/bin/python bench/bench_scale.py --child append "[\"rs\", \"$P\", ${2:-10000000}]" >> $D/measure.log 2>&1
t update .venv/bin/refstorage refs $P $LIVE --json
ls -l $P.referrers >> $D/measure.log
t q4 .venv/bin/refstorage refs $P $LIVE --json
t scan2 .venv/bin/refstorage refs $P $LIVE --scan --json
.venv/bin/python - $D >> $D/measure.log <<'PY'
import json, sys
d = sys.argv[1]
def load(n):
    x = json.load(open(f"{d}/{n}.json")); x.pop("method"); x.pop("method_note"); return x
print("build==scan", load("build") == load("scan"), "q1==scan", load("q1") == load("scan"),
      "update==scan2", load("update") == load("scan2"), "q4==scan2", load("q4") == load("scan2"),
      "referrers", len(load("scan")["referrers"]))
PY
echo "done $(date -u)" >> $D/measure.log
