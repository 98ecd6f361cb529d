"""Usage: ROUNDS_DIR=DIR python bench/rounds_reopen_pack.py build 1000000,2000000, then
`... measure 1000000,2000000 9 pack 1`.  Repeated rounds of reopen with the index and
pack, on databases built by bench_scale's own child (same shape), alternating
FileStorage / refstorage; medians."""
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale as b

D = os.environ.get("ROUNDS_DIR", "/tmp/rounds-db")
mode = sys.argv[1]
sizes = [int(x) for x in sys.argv[2].split(",")]
out = {}
for n in sizes:
    paths = {k: f"{D}/{k}{n}.{'fs' if k == 'fs' else 'rfs'}" for k in ("fs", "rs")}
    if mode == "build":
        for k, p in paths.items():
            print(n, k, b.run_child("build", k, p, n), flush=True)
        continue
    rounds = int(sys.argv[3])
    res = {"fs": [], "rs": []}
    for r in range(rounds):
        for k in (("fs", "rs") if r % 2 == 0 else ("rs", "fs")):
            res[k].append(b.run_child("reopen", k, paths[k], True))
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in res.items()}
    rss = {k: statistics.median(x["rss_after_open"] for x in v) for k, v in res.items()}
    print(n, "reopen medians", med, "ratio", med["rs"] / med["fs"],
          "rss ratio", rss["rs"] / rss["fs"], flush=True)
    out[n] = {"reopen": res}
    if "pack" in sys.argv[4:]:
        packs = {"fs": [], "rs": []}
        for r in range(int(sys.argv[5]) if len(sys.argv) > 5 else 1):
            for k in (("fs", "rs") if r % 2 == 0 else ("rs", "fs")):
                cp = paths[k] + ".packcopy"
                for suf in ("", ".index"):
                    if os.path.exists(paths[k] + suf):
                        shutil.copyfile(paths[k] + suf, cp + suf)
                packs[k].append(b.run_child("pack", k, cp))
                for suf in ("", ".index", ".old", ".lock", ".tmp", ".referrers"):
                    if os.path.exists(cp + suf):
                        os.remove(cp + suf)
        pm = {k: statistics.median(x["seconds"] for x in v) for k, v in packs.items()}
        pr = {k: max(x["maxrss"] for x in v) for k, v in packs.items()}
        print(n, "pack medians", pm, "ratio", pm["rs"] / pm["fs"],
              "peak rss", pr, pr["rs"] / pr["fs"], flush=True)
        out[n]["pack"] = packs
json.dump(out, open(f"{D}/rounds-{mode}-{time.strftime('%H%M%S')}.json", "w"))
