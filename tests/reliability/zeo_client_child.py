"""One ZEO client of test_zeo_faults.py: commits and checks until its deadline.

Usage: python zeo_client_child.py PORT INDEX CLIENTS SECONDS ACK_FILE SEED

Client INDEX owns two objects, root["a<INDEX>"] and root["b<INDEX>"]
(PersistentMappings made by the test before the clients start), and sets both
to the same counter n+1 in each of its transactions, so clients never
conflict.  After each acknowledged commit (commit() returned) it appends n+1
to ACK_FILE (flushed) for the test to compare with the file after each server
restart.  Between commits it checks the snapshot it sees:

- every client's a and b are equal (a transaction is seen whole or not at all);
- no client's counter goes down from one of its snapshots to the next (after
  a reconnect, ZEO's cache verification must drop stale cached state);
- its own counter is its last acknowledged value, or the value of a commit
  that failed in flight since then (which the server may or may not have made
  durable: a commit "in doubt").

The server is killed at random moments: operations then fail with
ClientDisconnected until ZEO reconnects by itself.  At the deadline it prints
one JSON line of figures (and the violations found) and exits.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter


def main() -> None:
    port, index, clients, seconds, ack_file, seed = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                      float(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    import transaction
    import ZEO
    from ZEO.Exceptions import ClientDisconnected

    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    db = ZEO.DB(("127.0.0.1", port), wait_timeout=30)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    acked = 0
    doubt: set[int] = set()  # values of commits that failed in flight since the last ack
    seen = [0] * clients
    figures: Counter = Counter()
    errors: Counter = Counter()
    violations: list[str] = []
    was_down = False
    with open(ack_file, "a", buffering=1) as acks:
        while time.monotonic() < deadline and len(violations) < 20:
            attempt = None
            try:
                # check the snapshot
                tm.begin()
                root = conn.root()
                values = []
                for j in range(clients):
                    a, b = root[f"a{j}"]["n"], root[f"b{j}"]["n"]
                    if a != b:
                        violations.append(f"client {j}: a={a} b={b} in one snapshot")
                    if a < seen[j]:
                        violations.append(f"client {j}: counter went down from {seen[j]} to {a}")
                    values.append(a)
                mine = values[index]
                if mine != acked and mine not in doubt:
                    violations.append(f"own counter {mine}, acknowledged {acked}, in doubt {sorted(doubt)}")
                seen = [max(s, v) for s, v in zip(seen, values, strict=True)]
                figures["snapshots checked"] += 1
                # commit the next value
                n = mine + 1
                root[f"a{index}"]["n"] = n
                root[f"b{index}"]["n"] = n
                attempt = n
                tm.commit()
                acked, attempt = n, None
                doubt.clear()
                acks.write(f"{n}\n")
                figures["commits acknowledged"] += 1
                if was_down:
                    figures["reconnections"] += 1
                    was_down = False
            except Exception as exc:  # counted and reported; the test decides which are allowed
                errors[type(exc).__name__] += 1
                was_down = was_down or isinstance(exc, ClientDisconnected)
                if attempt is not None:
                    doubt.add(attempt)
                    figures["commits in doubt"] += 1
                tm.abort()
                time.sleep(0.05)
            else:
                time.sleep(rng.uniform(0, 0.01))
    try:
        conn.close()
        db.close()
    except Exception:  # the server may be down at this moment
        pass
    print(json.dumps({"index": index, "acked": acked, "doubt": sorted(doubt), "figures": dict(figures),
                      "errors": dict(errors), "violations": violations}), flush=True)


if __name__ == "__main__":
    main()
