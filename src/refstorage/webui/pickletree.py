"""A ZODB record's class and state as a tree, read from the pickle's opcodes alone.

`parse_record(data)` runs a symbolic pickle machine over `pickletools.genops`:
every opcode builds a node (a constant, a container, a global *name*, a call
*description*, a persistent reference) instead of an object, so no module is
imported, no class is looked up and no callable runs, whatever the pickle
says.  The tree is then shown as HTML (`to_html`) or as indented text lines
(`to_lines`, which the history diff compares).

Both renderings are bounded whatever the pickle: MAX_ITEMS items per
container, MAX_DEPTH levels, MAX_STR characters per string, MAX_NODES
containers in all, and a container the pickle shares (its memo) is shown
once, then referred to as "shown above", so a small pickle whose containers
share each other level after level (a "billion laughs") stays small.
"""

from __future__ import annotations

import io
import pickletools
from collections.abc import Callable
from dataclasses import dataclass, field

from markupsafe import Markup, escape

MAX_ITEMS = 200  # items of one container shown (the rest are counted)
MAX_DEPTH = 40
MAX_STR = 400  # characters of a string or bytes shown
MAX_NODES = 5000  # containers and objects one rendering shows (the rest are counted)
MAX_INT_BITS = 4096  # larger ints are shown by their size (str() refuses beyond 4300 digits)


# -- nodes --------------------------------------------------------------------------------

class Node:
    pass


@dataclass(eq=False)
class Atom(Node):
    value: object  # None, bool, int, float, str, bytes


@dataclass(eq=False)
class Seq(Node):
    kind: str  # list, tuple, set, frozenset
    items: list = field(default_factory=list)


@dataclass(eq=False)
class Map(Node):
    items: list = field(default_factory=list)  # [(key node, value node)]


@dataclass(eq=False)
class Global(Node):
    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Obj(Node):
    """An object the pickle would build: cls(*args) (or cls.__new__) then its state set."""
    cls: Node
    args: Node | None = None
    how: str = "call"  # call (REDUCE), new (NEWOBJ), inst (INST/OBJ)
    state: Node | None = None
    kwargs: Node | None = None


@dataclass(eq=False)
class PRef(Node):
    """A persistent reference (ZODB's persistent id)."""
    oid: bytes | None
    cls: str | None = None
    kind: str = ""  # "", weak, cross-database (m/n) ...
    raw: Node | None = None


@dataclass(eq=False)
class Other(Node):
    text: str


@dataclass
class Record:
    """A record's two pickles: the class (meta) and the state."""
    cls_node: Node | None
    state: Node | None
    class_name: str | None
    error: str | None = None  # what stopped the reading, if something did
    error_at: int | None = None
    opcodes: int = 0


# -- the symbolic machine -----------------------------------------------------------------

class _Mark:
    pass


MARK = _Mark()

_ATOM_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})


class PickleError(Exception):
    pass


def _pop_mark(stack: list, metastack: list) -> list:
    items = stack[:]
    if not metastack:
        raise PickleError("no mark to pop to")
    stack[:] = metastack.pop()
    return items


def read_pickle(stream: io.BytesIO, counter: list[int] | None = None, memo: dict | None = None) -> Node:
    """The node one pickle builds, read from `stream` up to its STOP opcode.

    ZODB writes a record's two pickles with one pickler: pass the same `memo`."""
    stack: list = []
    metastack: list = []
    if memo is None:
        memo = {}

    def pop():
        if not stack:
            raise PickleError("stack underflow")
        v = stack.pop()
        if v is MARK:
            raise PickleError("unexpected mark")
        return v

    def top():
        if not stack or stack[-1] is MARK:
            raise PickleError("stack underflow")
        return stack[-1]

    for op, arg, pos in pickletools.genops(stream):
        if counter is not None:
            counter[0] += 1
        name = op.name
        if name in _ATOM_OPS:
            stack.append(Atom(arg))
        elif name in ("PROTO", "FRAME"):
            continue
        elif name == "STOP":
            if len(stack) != 1:
                raise PickleError(f"{len(stack)} items on the stack at STOP (offset {pos})")
            return pop()
        elif name == "NONE":
            stack.append(Atom(None))
        elif name == "NEWTRUE":
            stack.append(Atom(True))
        elif name == "NEWFALSE":
            stack.append(Atom(False))
        elif name == "BYTEARRAY8":
            stack.append(Obj(Global("builtins", "bytearray"), Seq("tuple", [Atom(arg)])))
        elif name == "MARK":
            metastack.append(stack[:])
            stack.clear()
        elif name == "POP":
            if stack and stack[-1] is MARK:
                stack.pop()
            elif stack:
                stack.pop()
            else:
                raise PickleError("stack underflow")
        elif name == "POP_MARK":
            _pop_mark(stack, metastack)
        elif name == "DUP":
            stack.append(top())
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise PickleError(f"memo key {arg} not defined (offset {pos})")
            stack.append(memo[arg])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = top()
        elif name == "MEMOIZE":
            memo[len(memo)] = top()
        elif name == "EMPTY_LIST":
            stack.append(Seq("list"))
        elif name == "EMPTY_TUPLE":
            stack.append(Seq("tuple"))
        elif name == "EMPTY_DICT":
            stack.append(Map())
        elif name == "EMPTY_SET":
            stack.append(Seq("set"))
        elif name == "LIST":
            stack.append(Seq("list", _pop_mark(stack, metastack)))
        elif name == "TUPLE":
            stack.append(Seq("tuple", _pop_mark(stack, metastack)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [pop() for _ in range(n)][::-1]
            stack.append(Seq("tuple", items))
        elif name == "FROZENSET":
            stack.append(Seq("frozenset", _pop_mark(stack, metastack)))
        elif name == "DICT":
            stack.append(Map(_pairs(_pop_mark(stack, metastack))))
        elif name == "APPEND":
            v = pop()
            _append(top(), [v])
        elif name == "APPENDS":
            items = _pop_mark(stack, metastack)
            _append(top(), items)
        elif name == "ADDITEMS":
            items = _pop_mark(stack, metastack)
            _append(top(), items)
        elif name == "SETITEM":
            v = pop()
            k = pop()
            _setitems(top(), [(k, v)])
        elif name == "SETITEMS":
            pairs = _pairs(_pop_mark(stack, metastack))
            _setitems(top(), pairs)
        elif name == "GLOBAL":
            module, _, gname = str(arg).partition(" ")
            stack.append(Global(module, gname))
        elif name == "STACK_GLOBAL":
            gname = pop()
            module = pop()
            stack.append(Global(_text(module), _text(gname)))
        elif name in ("EXT1", "EXT2", "EXT4"):
            stack.append(Other(f"extension code {arg}"))
        elif name == "REDUCE":
            args = pop()
            func = pop()
            stack.append(Obj(func, args, "call"))
        elif name == "NEWOBJ":
            args = pop()
            cls = pop()
            stack.append(Obj(cls, args, "new"))
        elif name == "NEWOBJ_EX":
            kwargs = pop()
            args = pop()
            cls = pop()
            stack.append(Obj(cls, args, "new", kwargs=kwargs))
        elif name == "INST":
            args = _pop_mark(stack, metastack)
            module, _, gname = str(arg).partition(" ")
            stack.append(Obj(Global(module, gname), Seq("tuple", args), "inst"))
        elif name == "OBJ":
            items = _pop_mark(stack, metastack)
            if not items:
                raise PickleError("OBJ without a class")
            stack.append(Obj(items[0], Seq("tuple", items[1:]), "inst"))
        elif name == "BUILD":
            state = pop()
            obj = top()
            if isinstance(obj, Obj) and obj.state is None:
                obj.state = state
            else:
                stack[-1] = Obj(Other("setstate"), Seq("tuple", [obj, state]), "call")
        elif name == "PERSID":
            stack.append(_pref(Atom(arg)))
        elif name == "BINPERSID":
            stack.append(_pref(pop()))
        elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
            if name == "NEXT_BUFFER":
                stack.append(Other("out-of-band buffer"))
        else:
            raise PickleError(f"opcode {name} not understood (offset {pos})")
    raise PickleError("pickle ends without STOP")


def _pairs(items: list) -> list:
    if len(items) % 2:
        raise PickleError("an odd number of items for a dict")
    return list(zip(items[::2], items[1::2], strict=True))


def _text(node) -> str:
    if isinstance(node, Atom) and isinstance(node.value, (str, bytes)):
        v = node.value
        return v.decode("latin-1") if isinstance(v, bytes) else v
    raise PickleError("STACK_GLOBAL needs two strings")


def _append(target, items: list) -> None:
    if isinstance(target, Seq):
        target.items.extend(items)
    elif isinstance(target, Obj):  # a list subclass: extend() called on the object
        target.state = target.state or Seq("list")
        if isinstance(target.state, Seq):
            target.state.items.extend(items)
    else:
        raise PickleError("APPEND to something that is not a list")


def _setitems(target, pairs: list) -> None:
    if isinstance(target, Map):
        target.items.extend(pairs)
    elif isinstance(target, Obj):  # a dict subclass
        target.state = target.state or Map()
        if isinstance(target.state, Map):
            target.state.items.extend(pairs)
    else:
        raise PickleError("SETITEM on something that is not a dict")


def _pref(pid: Node) -> PRef:
    """ZODB's persistent ids: oid, (oid, class), [kind, (...)] for weak and cross-database refs."""
    if isinstance(pid, Atom) and isinstance(pid.value, (bytes, str)):
        return PRef(_oid(pid), raw=pid)
    if isinstance(pid, Seq) and pid.kind == "tuple" and pid.items:
        return PRef(_oid(pid.items[0]), _class_name(pid.items[1]) if len(pid.items) > 1 else None, raw=pid)
    if isinstance(pid, Seq) and pid.kind == "list" and pid.items:
        first = pid.items[0]
        kind = first.value if isinstance(first, Atom) and isinstance(first.value, str) else "?"
        label = {"w": "weak", "m": "cross-database", "n": "cross-database"}.get(kind, kind)
        rest = pid.items[1] if len(pid.items) > 1 else None
        oid = None
        cls = None
        if isinstance(rest, Seq):
            for item in rest.items:
                o = _oid(item)
                if o is not None and oid is None:
                    oid = o
                elif isinstance(item, Global):
                    cls = item.dotted
        return PRef(oid, cls, label, raw=pid)
    return PRef(None, raw=pid)


def _oid(node) -> bytes | None:
    if isinstance(node, Atom) and isinstance(node.value, (bytes, str)):
        v = node.value
        if isinstance(v, str):
            v = v.encode("latin-1", "replace")
        if len(v) == 8:
            return v
    return None


def _class_name(node) -> str | None:
    if isinstance(node, Global):
        return node.dotted
    if isinstance(node, Seq) and node.items:  # (class, newargs) or ((module, name), None)
        first = node.items[0]
        if isinstance(first, Global):
            return first.dotted
        if isinstance(first, Seq) and len(first.items) == 2 and all(
                isinstance(i, Atom) and isinstance(i.value, str) for i in first.items):
            return ".".join(i.value for i in first.items)
    return None


def parse_record(data: bytes) -> Record:
    """A ZODB record's class pickle and state pickle, as nodes; never raises on bad data."""
    stream = io.BytesIO(data)
    counter = [0]
    memo: dict = {}
    cls_node = state = None
    try:
        cls_node = read_pickle(stream, counter, memo)
        state = read_pickle(stream, counter, memo)
        rest = len(data) - stream.tell()
        error = f"{rest} bytes after the state pickle" if rest else None
        return Record(cls_node, state, _class_name(cls_node), error, stream.tell() if rest else None,
                      counter[0])
    except Exception as exc:  # genops raises ValueError and others on damaged data
        return Record(cls_node, state, _class_name(cls_node) if cls_node is not None else None,
                      f"{type(exc).__name__}: {exc}", stream.tell(), counter[0])


# -- text ---------------------------------------------------------------------------------

def oid_label(oid: bytes) -> str:
    s = f"{int.from_bytes(oid, 'big'):x}"
    return "0x" + ("0" + s if len(s) % 2 else s)


def atom_repr(value) -> str:
    """repr(value), at most about MAX_STR characters (a huge string is cut before its repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        return f"<int of {value.bit_length():,} bits>"
    if isinstance(value, (str, bytes, bytearray)) and len(value) > MAX_STR:
        r = repr(value[:MAX_STR])[:MAX_STR]
        return r + f"... ({len(value):,} {'chars' if isinstance(value, str) else 'bytes'})"
    r = repr(value)
    if len(r) > MAX_STR:
        r = r[:MAX_STR] + "..."
    return r


def short(node: Node) -> str:
    """A one-line summary of a node."""
    if isinstance(node, Atom):
        return atom_repr(node.value)
    if isinstance(node, Global):
        return node.dotted
    if isinstance(node, PRef):
        label = oid_label(node.oid) if node.oid is not None else "?"
        return f"<{node.kind + ' ' if node.kind else ''}ref {label}{' ' + node.cls if node.cls else ''}>"
    if isinstance(node, Seq):
        return f"{node.kind}[{len(node.items)}]"
    if isinstance(node, Map):
        return f"dict[{len(node.items)}]"
    if isinstance(node, Obj):
        return f"{short(node.cls)}(...)"
    if isinstance(node, Other):
        return f"<{node.text}>"
    return "?"


def _is_leaf(node) -> bool:
    return isinstance(node, (Atom, Global, PRef, Other)) or (
        isinstance(node, (Seq, Map)) and not node.items)


def _empty(node) -> str:
    if isinstance(node, Seq):
        return {"list": "[]", "tuple": "()", "set": "set()", "frozenset": "frozenset()"}[node.kind]
    if isinstance(node, Map):
        return "{}"
    return short(node)


def _children(node) -> list[tuple[str, Node]]:
    """(label, child) pairs of a container or object, for both renderings."""
    if isinstance(node, Seq):
        return [(f"[{i}]" if node.kind in ("list", "tuple") else "*", c) for i, c in enumerate(node.items)]
    if isinstance(node, Map):
        return [(short(k) if _is_leaf(k) else f"key {short(k)}", v) for k, v in node.items]
    if isinstance(node, Obj):
        out = []
        if node.args is not None and not (isinstance(node.args, Seq) and not node.args.items):
            out.append(("args", node.args))
        if node.kwargs is not None:
            out.append(("kwargs", node.kwargs))
        if node.state is not None:
            out.append(("state", node.state))
        return out
    return []


def _title(node) -> str:
    if isinstance(node, Obj):
        how = {"call": "called", "new": "new", "inst": "instance"}[node.how]
        return f"{short(node.cls)} ({how})"
    if isinstance(node, Seq):
        return f"{node.kind} ({len(node.items)} items)"
    if isinstance(node, Map):
        return f"dict ({len(node.items)} items)"
    return short(node)


class _Budget:
    """What one rendering may still show: containers shown once each, MAX_NODES in all."""

    def __init__(self) -> None:
        self.shown: set[int] = set()
        self.left = MAX_NODES
        self.cut = 0  # containers not shown for lack of budget

    def take(self, node: Node) -> bool:
        if self.left <= 0:
            self.cut += 1
            return False
        self.left -= 1
        self.shown.add(id(node))
        return True


def to_lines(node: Node | None, indent: str = "", label: str = "",
             budget: _Budget | None = None) -> list[str]:
    """The tree as indented text, one line per leaf or container (for diffs)."""
    top = budget is None
    if budget is None:
        budget = _Budget()
    head = f"{indent}{label}: " if label else indent
    if node is None:
        return [head + "(nothing)"]
    if _is_leaf(node):
        return [head + (_empty(node) if isinstance(node, (Seq, Map)) else short(node))]
    if id(node) in budget.shown or len(indent) > 2 * MAX_DEPTH:
        return [head + _title(node) + " (shown above)"]
    if not budget.take(node):
        return [head + _title(node) + " (not shown)"]
    out = [head + _title(node)]
    kids = _children(node)
    for lab, child in kids[:MAX_ITEMS]:
        out.extend(to_lines(child, indent + "  ", lab, budget))
    if len(kids) > MAX_ITEMS:
        out.append(f"{indent}  ... {len(kids) - MAX_ITEMS} more")
    if top and budget.cut:
        out.append(f"... {budget.cut:,} more containers not shown (at most {MAX_NODES:,} are)")
    return out


# -- HTML ---------------------------------------------------------------------------------

def to_html(node: Node | None, link: Callable[[bytes], str], depth: int = 0,
            budget: _Budget | None = None, open_depth: int = 3) -> Markup:
    """The tree as nested <details> lists; persistent references are links made by `link(oid)`."""
    top = budget is None
    if budget is None:
        budget = _Budget()
    if node is None:
        return Markup('<span class="none">(nothing)</span>')
    if _is_leaf(node):
        return _leaf_html(node, link)
    if id(node) in budget.shown or depth > MAX_DEPTH:
        return Markup('<span class="muted">') + escape(_title(node)) + Markup(" (shown above)</span>")
    if not budget.take(node):
        return Markup('<span class="muted">') + escape(_title(node)) + Markup(" (not shown)</span>")
    kids = _children(node)
    parts = [Markup("<details class=\"node\"{}><summary>{}</summary><ul>").format(
        Markup(" open") if depth < open_depth else Markup(""), _title_html(node, link))]
    for lab, child in kids[:MAX_ITEMS]:
        parts.append(Markup('<li><span class="key">{}</span>: {}</li>').format(
            lab, to_html(child, link, depth + 1, budget, open_depth)))
    if len(kids) > MAX_ITEMS:
        parts.append(Markup('<li class="muted">... {} more</li>').format(len(kids) - MAX_ITEMS))
    parts.append(Markup("</ul></details>"))
    if top and budget.cut:
        parts.append(Markup('<p class="muted">... {} more containers not shown (at most {} are)</p>').format(
            f"{budget.cut:,}", f"{MAX_NODES:,}"))
    return Markup("").join(parts)


def _title_html(node, link) -> Markup:
    if isinstance(node, Obj):
        how = {"call": "called", "new": "new", "inst": "instance"}[node.how]
        cls = _leaf_html(node.cls, link) if _is_leaf(node.cls) else escape(short(node.cls))
        return Markup('<span class="cls">{}</span> <span class="muted">({})</span>').format(cls, how)
    return escape(_title(node))


def _leaf_html(node, link) -> Markup:
    if isinstance(node, PRef):
        if node.oid is None:
            return Markup('<span class="pref">{}</span>').format(short(node))
        kind = f"{node.kind} " if node.kind else ""
        return Markup('<a class="pref" href="{}">{}&rarr; {}</a>{}').format(
            link(node.oid), kind, oid_label(node.oid),
            Markup(' <span class="cls">{}</span>').format(node.cls) if node.cls else "")
    if isinstance(node, Global):
        return Markup('<span class="global">{}</span>').format(node.dotted)
    if isinstance(node, Atom):
        css = type(node.value).__name__ if node.value is not None else "none"
        return Markup('<span class="atom {}">{}</span>').format(css, atom_repr(node.value))
    if isinstance(node, (Seq, Map)):
        return Markup('<span class="atom">{}</span>').format(_empty(node))
    return Markup('<span class="muted">{}</span>').format(short(node))
