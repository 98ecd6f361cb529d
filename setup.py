"""Build hook for the optional C reference scanner (everything else is in pyproject.toml).

`refstorage._refscan` speeds up finding the references of stored records.  It
is optional: when it cannot be compiled (no C compiler, no Python headers) the
install still succeeds and refstorage uses its pure-Python path, which gives
the same answers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "refstorage._refscan",
            sources=["src/refstorage/_refscan.c"],
            optional=True,
        )
    ]
)
