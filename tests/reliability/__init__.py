"""Reliability tests (GitHub issue 7): crash, power loss, corruption, faults, bad input.

See docs/reliability.md for what each module proves, how to run it and the
figures measured.  ``pytest --long`` runs the long profile.
"""
