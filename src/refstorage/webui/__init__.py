"""`refstorage inspect`: a read-only web UI over a refstorage file that never runs its pickles.

- `pickletree`: a record's class and state as a tree, read from the pickle
  opcodes by a symbolic machine (nothing imported, nothing called);
- `model`: `Inspector`, the file opened read-only and indexed once;
- `app`: the Flask application (token-checked, GET only) and its server.

Needs the `inspect` extra (Flask, plotly): ``pip install 'refstorage[inspect]'``.
"""
