"""Child side of test_bounded_memory.py: damaged large files read under RLIMIT_AS.

Usage: bounded_child.py SPEC_JSON.  After importing everything it limits its
address space to what it uses now plus ``budget`` bytes, then runs the
steps of the spec and prints one JSON line: {step: outcome}.  An outcome is
"ok", the name of the exception raised (with its offset), or "MemoryError".
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ZODB.utils import p64  # noqa: E402

import refstorage  # noqa: E402
from refstorage.errors import CorruptedError  # noqa: E402
from refstorage.tools.recover import recover  # noqa: E402
from refstorage.tools.verify import verify  # noqa: E402


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def outcome(fn) -> str:
    try:
        got = fn()
    except MemoryError:
        return "MemoryError"
    except CorruptedError as exc:
        return f"{type(exc).__name__}@{exc.offset}"
    except Exception as exc:
        traceback.print_exc()
        return f"{type(exc).__name__}: {exc}"
    return "ok" if got is None else f"ok {got}"


def iterate(path: str) -> None:
    st = refstorage.FileStorage(path, read_only=True)
    try:
        for t in st.iterator():
            for _ in t:
                pass
    finally:
        st.close()


def load(path: str, oid: int, before: bool = False) -> None:
    st = refstorage.FileStorage(path, read_only=True)
    try:
        if before:
            st.loadBefore(p64(oid), st.getTid(p64(oid)))
        else:
            st.load(p64(oid))
    finally:
        st.close()


def open_close(path: str, read_only: bool) -> None:
    refstorage.FileStorage(path, read_only=read_only).close()


def verify_problems(path: str) -> str:
    report = verify(path)
    return ",".join(sorted({p.kind for p in report.problems})) or "clean"


def main() -> None:
    spec = json.loads(sys.argv[1])
    limit = vm_size() + spec["budget"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    results = {}
    for name, (what, *args) in spec["steps"].items():
        fn = {"load": load, "open": open_close, "iterate": iterate, "verify": verify_problems,
              "recover": lambda src, dst: recover(src, dst).verify.ok,
              "truncate": os.truncate}[what]
        results[name] = outcome(lambda fn=fn, args=args: fn(*args))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
