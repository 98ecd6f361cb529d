"""The logic behind the `refstorage` command's tools, importable without click.

- `common`: opening a log read-only, oids, tids and times, class names read
  from pickles without unpickling them;
- `walk`: every transaction with its records, checked, resynchronising after damage;
- `dump`, `verify`, `info` (also tail, history, refs), `recover`, `backup`
  (also restore): one module per tool, each returning plain data that the
  command-line layer (`refstorage.cli.tools`) prints as text or JSON.

Everything is read through `refstorage.log`/`refstorage.fileformat` and every
file is touched through `refstorage.fileio`; nothing here parses bytes or
loads a pickle.
"""
