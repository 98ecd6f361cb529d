"""Demo: store a small lending library in a refstorage file, then read it back.

    python -m refstorage.demo [--dir DIR] [--keep]
    python -m refstorage.demo --read PATH

The writer creates ``library.rfs`` (in a fresh temporary directory, or in
DIR), opens ``ZODB.DB(refstorage.FileStorage(path))`` and commits a library of
a few thousand persistent objects (`refstorage._demo_model`) over five
transactions that add, update and delete objects.  It writes what it expects
the file to hold to ``library.expected.json`` next to the database, closes
everything and runs ``--read`` in a fresh Python process.

The reader opens the file read-only, walks the object graph, checks the BTrees
and the cross references, compares everything with the expectations and
prints a summary.  Either mode exits non-zero when something doesn't match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

import transaction
import ZODB
from BTrees.check import check as btree_check
from ZODB.serialize import referencesf
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import get_pickle_metadata, load_current, z64

import refstorage
from refstorage._demo_model import (
    Author,
    Book,
    Library,
    Loan,
    Member,
    digest,
    integrity_problems,
    summary_counts,
)

DB_NAME = "library.rfs"
EXPECTED_SUFFIX = ".expected.json"

N_AUTHORS = 200
N_BOOKS = 2000
N_MEMBERS = 600
N_LOANS = 1500

FIRST = ["Ana", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tova", "Uma", "Viktor", "Wen", "Yara"]
LAST = ["Costa", "Okafor", "Lindqvist", "Haddad", "Novak", "Tanaka", "Moreau", "Kowalski", "Silva", "Brennan",
        "Iyer", "Schulz", "Petrov", "Nakamura", "Alvarez", "Dubois", "Mensah", "Larsen", "Rossi", "Yilmaz"]
COUNTRIES = ["PT", "NG", "SE", "LB", "CZ", "JP", "FR", "PL", "BR", "IE", "IN", "DE", "RU", "ES", "IT", "TR"]
ADJ = ["Silent", "Hidden", "Last", "Northern", "Broken", "Golden", "Quiet", "Forgotten", "Winter", "Distant",
       "Paper", "Burning", "Patient", "Little", "Endless"]
NOUN = ["River", "Garden", "Archive", "Harbour", "Machine", "Orchard", "Lighthouse", "Map", "Kingdom",
        "Library", "Season", "Bridge", "Compass", "Island", "Clockmaker"]
TAGS = ["fiction", "history", "science", "poetry", "travel", "children", "crime", "biography", "cooking",
        "art"]


# --------------------------------------------------------------------------- writer


def _commit(user: str, note: str) -> None:
    txn = transaction.get()
    txn.user = user
    txn.note(note)
    txn.commit()


def build(db, rng: random.Random, log) -> list[dict]:
    """Commit the library over five transactions; return [{tid, user, description}]."""
    history = []
    conn = db.open()
    root = conn.root()

    def commit(user, note):
        _commit(user, note)
        tid = db.storage.lastTransaction()
        history.append({"tid": tid.hex(), "user": user, "description": note})
        log(f"  committed {TimeStamp(tid)}  {user:<16} {note}")

    # 1. the catalogue
    lib = root["library"] = Library("Riverside Public Library", "Porto")
    authors = []
    for i in range(N_AUTHORS):
        name = f"{FIRST[i % len(FIRST)]} {LAST[(i * 7) % len(LAST)]} {chr(65 + i // 24 % 26)}."
        a = Author(name, born=rng.randint(1890, 1995), country=rng.choice(COUNTRIES))
        lib.authors[name] = a
        authors.append(a)
    # a few prolific authors, a long tail of authors with one or two books
    author_weights = [1 / (i + 1) for i in range(N_AUTHORS)]
    for i in range(N_BOOKS):
        isbn = f"978-1-{(i * 37) % 90000 + 10000:05d}-{i % 10}"
        author = rng.choices(authors, weights=author_weights)[0]
        title = f"The {rng.choice(ADJ)} {rng.choice(NOUN)}"
        book = Book(isbn, title, author, year=max(author.born + 20, rng.randint(1920, 2024)),
                    copies=rng.randint(1, 4), tags=rng.sample(TAGS, rng.randint(1, 3)))
        lib.books[isbn] = book
        author.books.append(book)
    commit("librarian:alice", f"Open the catalogue: {N_AUTHORS} authors, {N_BOOKS} books")

    # 2. members
    for _ in range(N_MEMBERS):
        mid = lib.next_member_id
        lib.next_member_id += 1
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        email = f"{name.lower().replace(' ', '.')}.{mid}@example.org"
        lib.members[mid] = Member(mid, name, email, joined=rng.randint(2010, 2024))
    commit("desk:bob", f"Register {N_MEMBERS} members")

    # 3. loans, never more copies out than the library owns
    isbns = list(lib.books.keys())
    out = Counter()
    while len(lib.loans) < N_LOANS:
        book = lib.books[rng.choice(isbns)]
        if out[book.isbn] >= book.copies:
            continue
        member = lib.members[rng.randint(1, N_MEMBERS)]
        lid = lib.next_loan_id
        lib.next_loan_id += 1
        loan = Loan(lid, book, member, day_out=rng.randint(1, 60))
        lib.loans[lid] = loan
        member.loans.append(loan)
        out[book.isbn] += 1
    commit("desk:bob", f"Lend {N_LOANS} books")

    # 4. returns and catalogue corrections
    returned = 0
    for loan in rng.sample(list(lib.loans.values()), 700):
        loan.day_back = loan.day_out + rng.randint(1, 30)
        returned += 1
    corrected = rng.sample(isbns, 300)
    for isbn in corrected:
        book = lib.books[isbn]
        book.edition += 1
        book.title += " (revised)"
        book.copies += 1
    commit("librarian:alice", f"Record {returned} returns, revise {len(corrected)} books")

    # 5. weeding: drop books never lent, authors left without books,
    #    members who never borrowed and old returned loans
    lent = {loan.book.isbn for loan in lib.loans.values()}
    never_lent = [isbn for isbn in isbns if isbn not in lent]
    drop_books = rng.sample(never_lent, min(150, len(never_lent)))
    for isbn in drop_books:
        book = lib.books.pop(isbn)
        book.author.books.remove(book)
    drop_authors = [name for name, a in lib.authors.items() if not a.books]
    for name in drop_authors:
        del lib.authors[name]
    idle = [mid for mid, m in lib.members.items() if not m.loans]
    drop_members = idle[:50]
    for mid in drop_members:
        del lib.members[mid]
    old = [lid for lid, loan in lib.loans.items() if not loan.active and loan.day_back < 25]
    for lid in old:
        loan = lib.loans.pop(lid)
        loan.member.loans.remove(loan)
    commit("librarian:carol",
           f"Weed: remove {len(drop_books)} books, {len(drop_authors)} authors, "
           f"{len(drop_members)} members, archive {len(old)} loans")

    conn.close()
    return history


def storage_walk(storage) -> tuple[Counter, int]:
    """Follow references from the root oid through the storage itself.

    Returns (objects per class, number of reachable objects).  This reads
    pickles only, never instantiating objects, so it sees exactly what is
    stored, BTree buckets included.
    """
    classes: Counter = Counter()
    seen = {z64}
    todo = [z64]
    while todo:
        oid = todo.pop()
        data, _tid = load_current(storage, oid)
        module, name = get_pickle_metadata(data)
        classes[f"{module}.{name}"] += 1
        for ref in referencesf(data):
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return classes, len(seen)


def transaction_log(storage) -> list[dict]:
    """[{tid, user, description, records}] for every transaction, oldest first."""
    out = []
    it = storage.iterator()
    try:
        for txn in it:
            out.append({
                "tid": txn.tid.hex(),
                "user": txn.user.decode("utf-8", "replace"),
                "description": txn.description.decode("utf-8", "replace"),
                "records": sum(1 for _ in txn),
            })
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return out


def check_stored_refs(storage) -> tuple[int, int, list[str]]:
    """Compare the references stored with every record to its pickle's.

    refstorage's iterator reports them as `refs`, the referenced oids joined
    (8 bytes each).  Returns (records checked, references, problems).
    """
    nrecords = nrefs = 0
    problems = []
    it = storage.iterator()
    try:
        for txn in it:
            for rec in txn:
                refs = getattr(rec, "refs", None)
                if refs is None or rec.data is None:
                    continue
                stored = [refs[i:i + 8] for i in range(0, len(refs), 8)]
                actual = list(dict.fromkeys(referencesf(rec.data)))
                nrecords += 1
                nrefs += len(stored)
                if sorted(stored) != sorted(actual):
                    problems.append(f"record {rec.oid.hex()}@{rec.tid.hex()}: stored references "
                                    f"{[r.hex() for r in stored]} != the pickle's "
                                    f"{[r.hex() for r in actual]}")
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return nrecords, nrefs, problems


def write(directory: str, log=print) -> str:
    """Create the demo database in `directory`; return its path."""
    path = os.path.join(directory, DB_NAME)
    if os.path.exists(path):
        raise SystemExit(f"demo: {path} already exists; choose an empty --dir")
    rng = random.Random(20240611)
    storage = refstorage.FileStorage(path)
    db = ZODB.DB(storage)
    try:
        log(f"Writing {path}")
        history = build(db, rng, log)
        # What the reader must find.  The class counts and the transaction
        # log are taken from the open storage here and compared by the reader
        # after a reopen in another process; the application counts and the
        # digest come from the objects this process committed.
        conn = db.open()
        lib = conn.root()["library"]
        expected = {
            "app": summary_counts(lib),
            "digest": digest(lib),
            "examples": {"book": lib.books.minKey(), "member": lib.members.minKey(),
                         "loan": lib.loans.maxKey()},
        }
        conn.close()
        classes, reachable = storage_walk(storage)
        expected["classes"] = dict(classes)
        expected["reachable"] = reachable
        expected["objects"] = len(storage)
        txns = transaction_log(storage)
        # Our own commits must be the last ones, in order, with our metadata.
        ours = [{k: t[k] for k in ("tid", "user", "description")} for t in txns[-len(history):]]
        if ours != history:
            raise SystemExit(f"demo: the storage's iterator disagrees with the commits:\n"
                             f"{ours}\n!= {history}")
        expected["transactions"] = txns
        expected["last_tid"] = storage.lastTransaction().hex()
    finally:
        db.close()
    with open(path + EXPECTED_SUFFIX, "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    log(f"Closed; {os.path.getsize(path):,} bytes on disk, expectations in {os.path.basename(path)}"
        f"{EXPECTED_SUFFIX}")
    return path


# --------------------------------------------------------------------------- reader


def _fmt_tid(tid_hex: str) -> str:
    return str(TimeStamp(bytes.fromhex(tid_hex)))[:23]


def read(path: str) -> int:
    """Open `path` read-only, check it against its expectations, print a summary."""
    problems: list[str] = []

    def expect(what, got, want):
        if got != want:
            problems.append(f"{what}: found {got!r}, expected {want!r}")

    exp_path = path + EXPECTED_SUFFIX
    try:
        with open(exp_path) as f:
            expected = json.load(f)
    except FileNotFoundError:
        print(f"demo: no {exp_path}; only checking internal consistency", file=sys.stderr)
        expected = None

    storage = refstorage.FileStorage(path, read_only=True)
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        if "library" not in root:
            print(f"demo: {path} holds no library", file=sys.stderr)
            return 1
        lib = root["library"]
        counts = summary_counts(lib)

        # BTrees: internal structure (_check) and key order/bucket links (check)
        for name, tree in lib.btrees().items():
            try:
                tree._check()
                btree_check(tree)
            except AssertionError as e:
                problems.append(f"BTree library.{name} is damaged: {e}")
        problems.extend(integrity_problems(lib))
        classes, reachable = storage_walk(storage)
        nobjects = len(storage)
        txns = transaction_log(storage)
        last_tid = storage.lastTransaction().hex()
        ref_records, nrefs, ref_problems = check_stored_refs(storage)
        problems.extend(ref_problems)

        if expected is not None:
            expect("library counts", counts, expected["app"])
            expect("content digest", digest(lib), expected["digest"])
            expect("reachable objects by class", dict(classes), expected["classes"])
            expect("reachable objects", reachable, expected["reachable"])
            expect("len(storage)", nobjects, expected["objects"])
            expect("lastTransaction()", last_tid, expected["last_tid"])
            expect("number of transactions", len(txns), len(expected["transactions"]))
            for got, want in zip(txns, expected["transactions"], strict=False):  # length checked above
                expect(f"transaction {want['tid']}", got, want)

        # ---- the summary
        size = os.path.getsize(path)
        print(f"\n{path}: {size:,} bytes ({size / 1024 / 1024:.2f} MiB)")
        print(f"{lib.name}, {lib.city}: {counts['authors']} authors, {counts['books']} books "
              f"({counts['copies']} copies), {counts['members']} members, {counts['loans']} loans "
              f"({counts['active_loans']} out)")
        print(f"\nObjects: {nobjects:,} in the storage, {reachable:,} reachable from the root "
              f"({nobjects - reachable:,} unreachable, kept until a pack)")
        for cls, n in classes.most_common():
            print(f"  {n:6,}  {cls}")

        if ref_records:
            print(f"\nReferences stored with the records: {nrefs:,} in {ref_records:,} records"
                  + (", each list equal to its pickle's" if not ref_problems else ""))
        else:
            print("\n(the storage's iterator reports no stored references to check)")

        print("\nExamples:")
        isbn = expected["examples"]["book"] if expected else lib.books.minKey()
        book = lib.books[isbn]
        print(f"  {book!r}: edition {book.edition}, {book.copies} copies, tags {', '.join(book.tags)}")
        n = len(book.author.books)
        print(f"  {book.author!r}: {n} book{'' if n == 1 else 's'} in the catalogue")
        member = lib.members[expected["examples"]["member"] if expected else lib.members.minKey()]
        print(f"  {member!r}: joined {member.joined}, {len(member.loans)} loans on record")
        loan = lib.loans[expected["examples"]["loan"] if expected else lib.loans.maxKey()]
        print(f"  {loan!r}: {loan.book.title!r} to {loan.member.name}")

        print(f"\nTransactions ({len(txns)}, oldest first; times are UTC):")
        for t in txns:
            user = t["user"] or "-"
            print(f"  {_fmt_tid(t['tid'])}  {user:<16} {t['records']:5,} records  {t['description']}")

        print("\nChecks: BTree structure (_check, BTrees.check), cross references, stored references"
              + (", counts, digest, classes, transaction log vs. what was written" if expected else ""))
        conn.close()
    finally:
        db.close()

    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems[:50]:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("All checks passed.")
    return 0


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refstorage.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="directory for the database (default: a fresh temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--read", metavar="PATH", help="only read and check an existing demo database")
    args = parser.parse_args(argv)

    if args.read:
        return read(args.read)

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        directory, cleanup = args.dir, False
    else:
        directory, cleanup = tempfile.mkdtemp(prefix="refstorage-demo-"), not args.keep
    try:
        path = write(directory)
        print(f"\nReading it back in a fresh process: {sys.executable} -m refstorage.demo --read {path}",
              flush=True)
        reader = [sys.executable, "-m", "refstorage.demo", "--read", path]
        rc = subprocess.call(reader, stdin=subprocess.DEVNULL)
        if rc != 0:
            print(f"demo: the reader failed (exit status {rc}); files kept in {directory}", file=sys.stderr)
            cleanup = False
        return rc
    except BaseException:
        if cleanup:
            print(f"demo: failed; files kept in {directory}", file=sys.stderr)
        cleanup = False
        raise
    finally:
        if cleanup:
            shutil.rmtree(directory, ignore_errors=True)
            print(f"(removed {directory}; use --dir DIR or --keep to keep the database)")


if __name__ == "__main__":
    sys.exit(main())
