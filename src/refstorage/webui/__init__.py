"""`refstorage inspect`: a read-only web UI over a refstorage file (or a storage through ZEO)
that never runs its pickles.

- `pickletree`: a record's class and state as a tree, read from the pickle
  opcodes by a symbolic machine (nothing imported, nothing called);
- `model`: `Model`, the tables the pages read, with two sources: `Inspector`, the
  file opened read-only and indexed once, and `ZeoInspector`, a ZEO-served storage
  indexed once from ZEO's remote iterator;
- `app`: the Flask application (token-checked, GET only) and its server.

Needs the `inspect` extra (Flask, plotly): ``pip install 'refstorage[inspect]'``.
"""
