"""Persistent classes used by `refstorage.demo`: a small lending library.

They live in their own module (not in ``demo``) so that a fresh process can
import them by name when it unpickles the stored records.

    Library
      .authors  OOBTree   name      -> Author
      .books    OOBTree   isbn      -> Book
      .members  IOBTree   member_id -> Member
      .loans    IOBTree   loan_id   -> Loan

Objects reference each other (a book its author, a loan its book and member,
an author and a member their PersistentLists of books and loans), which is
what refstorage records next to each pickle.
"""

from __future__ import annotations

import hashlib

from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.list import PersistentList


class Library(Persistent):
    def __init__(self, name: str, city: str):
        self.name = name
        self.city = city
        self.authors = OOBTree()
        self.books = OOBTree()
        self.members = IOBTree()
        self.loans = IOBTree()
        self.next_member_id = 1
        self.next_loan_id = 1

    def btrees(self):
        return {"authors": self.authors, "books": self.books,
                "members": self.members, "loans": self.loans}


class Author(Persistent):
    def __init__(self, name: str, born: int, country: str):
        self.name = name
        self.born = born
        self.country = country
        self.books = PersistentList()

    def __repr__(self):
        return f"Author({self.name!r}, born {self.born}, {self.country})"


class Book(Persistent):
    def __init__(self, isbn: str, title: str, author: Author, year: int, copies: int, tags=()):
        self.isbn = isbn
        self.title = title
        self.author = author
        self.year = year
        self.copies = copies
        self.tags = tuple(tags)
        self.edition = 1

    def __repr__(self):
        return f"Book({self.isbn}, {self.title!r} by {self.author.name}, {self.year})"


class Member(Persistent):
    def __init__(self, member_id: int, name: str, email: str, joined: int):
        self.member_id = member_id
        self.name = name
        self.email = email
        self.joined = joined
        self.loans = PersistentList()

    def __repr__(self):
        return f"Member(#{self.member_id} {self.name} <{self.email}>)"


class Loan(Persistent):
    def __init__(self, loan_id: int, book: Book, member: Member, day_out: int):
        self.loan_id = loan_id
        self.book = book
        self.member = member
        self.day_out = day_out
        self.day_back = None  # None while the book is still out

    @property
    def active(self) -> bool:
        return self.day_back is None

    def __repr__(self):
        state = "out" if self.active else f"returned day {self.day_back}"
        return (f"Loan(#{self.loan_id} {self.book.isbn} to member #{self.member.member_id}, "
                f"day {self.day_out}, {state})")


def summary_counts(lib: Library) -> dict:
    """Application-level counts of what the library holds."""
    return {
        "authors": len(lib.authors),
        "books": len(lib.books),
        "copies": sum(b.copies for b in lib.books.values()),
        "members": len(lib.members),
        "loans": len(lib.loans),
        "active_loans": sum(1 for loan in lib.loans.values() if loan.active),
    }


def digest(lib: Library) -> str:
    """A SHA-256 over a canonical dump of every field of every object.

    The writer computes it from the objects it committed, the reader from the
    objects it loaded; equal digests mean every value survived the round trip.
    """
    h = hashlib.sha256()

    def line(*fields):
        h.update("|".join(map(str, fields)).encode("utf-8") + b"\n")

    line("library", lib.name, lib.city, lib.next_member_id, lib.next_loan_id)
    for name, a in lib.authors.items():
        line("author", name, a.name, a.born, a.country, ",".join(b.isbn for b in a.books))
    for isbn, b in lib.books.items():
        line("book", isbn, b.isbn, b.title, b.author.name, b.year, b.copies, b.edition, ",".join(b.tags))
    for mid, m in lib.members.items():
        line("member", mid, m.member_id, m.name, m.email, m.joined, ",".join(str(x.loan_id) for x in m.loans))
    for lid, loan in lib.loans.items():
        line("loan", lid, loan.loan_id, loan.book.isbn, loan.member.member_id, loan.day_out, loan.day_back)
    return h.hexdigest()


def integrity_problems(lib: Library) -> list[str]:
    """Cross-reference checks; returns a list of human-readable problems."""
    problems = []
    for name, a in lib.authors.items():
        if a.name != name:
            problems.append(f"author key {name!r} holds {a.name!r}")
        for b in a.books:
            if lib.books.get(b.isbn) is not b:
                problems.append(f"author {name!r} lists {b.isbn}, which is not in the catalogue")
    for isbn, b in lib.books.items():
        if b.isbn != isbn:
            problems.append(f"book key {isbn} holds {b.isbn}")
        if lib.authors.get(b.author.name) is not b.author:
            problems.append(f"book {isbn}: author {b.author.name!r} is not in the author index")
        elif b not in b.author.books:
            problems.append(f"book {isbn} is missing from its author's list")
    for mid, m in lib.members.items():
        if m.member_id != mid:
            problems.append(f"member key {mid} holds #{m.member_id}")
        for loan in m.loans:
            if lib.loans.get(loan.loan_id) is not loan:
                problems.append(f"member #{mid} lists loan #{loan.loan_id}, which is not in the loan table")
    out_per_book: dict[str, int] = {}
    for lid, loan in lib.loans.items():
        if loan.loan_id != lid:
            problems.append(f"loan key {lid} holds #{loan.loan_id}")
        if lib.books.get(loan.book.isbn) is not loan.book:
            problems.append(f"loan #{lid}: book {loan.book.isbn} is not in the catalogue")
        if lib.members.get(loan.member.member_id) is not loan.member:
            problems.append(f"loan #{lid}: member #{loan.member.member_id} is not registered")
        elif loan not in loan.member.loans:
            problems.append(f"loan #{lid} is missing from its member's list")
        if loan.active:
            out_per_book[loan.book.isbn] = out_per_book.get(loan.book.isbn, 0) + 1
    for isbn, n in out_per_book.items():
        if n > lib.books[isbn].copies:
            problems.append(f"book {isbn}: {n} copies lent out but only {lib.books[isbn].copies} owned")
    return problems
