"""The package's imports follow the layer list in the README's "Layout" section.

Every import of a refstorage module, wherever it is written (module level,
inside a function, under ``if TYPE_CHECKING``), must point to a module of the
same item of the list or of an item above it.  Every module of the package
is named in the list, and every name in the list exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "refstorage"
SRC = ROOT / "src" / PACKAGE


def readme_layers(readme: str) -> dict[str, int]:
    """Unit name (``x.py`` or ``sub/``) -> layer number, from the Layout section's items."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    the_list = section.split("\n- ", 1)[1].split("\n\n", 1)[0]
    items = re.split(r"\n- ", "\n" + the_list)
    layers: dict[str, int] = {}
    for n, item in enumerate(i for i in items if i.strip()):
        for name in re.findall(r"`([A-Za-z_]\w*\.(?:py|c)|[A-Za-z_]\w*/)`", item):
            layers.setdefault(name, n)
    return layers


def unit_of(module: str, src: Path) -> str | None:
    """The layer unit of a dotted module name inside the package, None outside it."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "__init__.py"
    if (src / parts[1]).is_dir():
        return parts[1] + "/"
    if not (src / (parts[1] + ".py")).exists() and (src / (parts[1] + ".c")).exists():
        return parts[1] + ".c"  # a C extension module
    return parts[1] + ".py"


def _module_name(path: Path, src: Path) -> tuple[str, bool]:
    rel = path.relative_to(src).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts.pop()
    return ".".join(parts), is_pkg


def imports_of(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every refstorage import in the file, at any depth."""
    name, is_pkg = _module_name(path, src)
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                # `from . import fileio` imports a module; `from .x import y` imports x
                sub = f"{base}.{a.name}"
                sub_path = src.joinpath(*sub.split(".")[1:])
                is_module = sub_path.with_suffix(".py").exists() or sub_path.is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [(line, m) for line, m in found if m.split(".")[0] == PACKAGE]


def violations(src: Path, layers: dict[str, int]) -> list[str]:
    problems = []
    for path in sorted(src.rglob("*.py")):
        unit = unit_of(_module_name(path, src)[0], src)
        if unit == "__init__.py" and path.parent != src:
            continue  # (never: a subpackage's __init__ belongs to the subpackage)
        if unit not in layers:
            problems.append(f"{path.relative_to(src)}: not named in the README's layer list")
            continue
        for line, module in imports_of(path, src):
            target = unit_of(module, src)
            if target == unit:
                continue  # inside one module or subpackage
            if target not in layers:
                problems.append(f"{path.relative_to(src)}:{line}: imports {module}, "
                                "which the README's layer list does not name")
            elif layers[target] > layers[unit]:
                problems.append(f"{path.relative_to(src)}:{line}: imports {module} ({target}), "
                                f"listed below {unit}")
    for name in layers:
        if not (src / name).exists():
            problems.append(f"the README's layer list names {name}, which does not exist")
    return problems


def test_readme_lists_the_layers():
    layers = readme_layers((ROOT / "README.md").read_text())
    assert layers["errors.py"] == 0
    assert layers["fileio.py"] < layers["fileformat.py"] < layers["log.py"] < layers["storage.py"]
    assert layers["iterator.py"] == layers["undo.py"] == layers["copying.py"]


def test_every_import_points_down_the_readme_layer_list():
    layers = readme_layers((ROOT / "README.md").read_text())
    assert violations(SRC, layers) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / PACKAGE
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


LAYERS = readme_layers("\n## Layout\n\n- `low.py`: a\n- `mid.py`, `side.py`: b\n- `sub/`: c\n"
                       "- `__init__.py`: d\n\n## Next\n")


def test_the_check_catches_upward_imports_wherever_they_are(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "from .mid import x\n",
        "low.py": "def f():\n    from . import mid\n",  # lazy, upward
        "mid.py": "import typing\nif typing.TYPE_CHECKING:\n    from .sub.a import y\n"  # upward
                  "from . import low, side\n",  # down, and same item: fine
        "side.py": "from refstorage.low import z\n",  # absolute, down: fine
        "sub/__init__.py": "from . import a\n",  # inside the subpackage: fine
        "sub/a.py": "from ..mid import x\nfrom .. import low\nimport refstorage\n",  # the last: upward
    })
    found = violations(src, LAYERS)
    assert found == [
        "low.py:2: imports refstorage.mid (mid.py), listed below low.py",
        "mid.py:3: imports refstorage.sub.a (sub/), listed below mid.py",
        "sub/a.py:3: imports refstorage (__init__.py), listed below sub/",
    ]


def test_the_check_catches_unlisted_and_missing_modules(tmp_path):
    src = _tree(tmp_path, {"__init__.py": "", "low.py": "", "mid.py": "", "side.py": "",
                           "extra.py": "", "sub/__init__.py": ""})
    assert violations(src, LAYERS) == ["extra.py: not named in the README's layer list"]
    (src / "side.py").unlink()
    assert violations(src, LAYERS)[-1] == "the README's layer list names side.py, which does not exist"


def test_no_module_shadows_a_builtin_or_a_standard_module():
    import builtins
    import sys

    taken = set(sys.stdlib_module_names) | set(dir(builtins))
    names = {p.stem for p in SRC.rglob("*.py") if p.stem != "__init__"} | {
        p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(names & taken) == []
