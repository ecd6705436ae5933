"""Queries over checkpoint metadata: ``--where`` filters, ``--sort`` keys, ``--columns``, tables and DataFrames.

A *row* is what ``ckpt ls --json`` prints for a checkpoint: ``ref``, ``run``, ``step``, ``created``, ``epoch``,
``logical_bytes``, ``stored_bytes``, ``ratio``, ``tensors`` and ``metadata`` (non-finite floats decoded). A
*field path* such as ``metrics.val_loss``, ``lr.0`` or ``hparams["batch size"]`` is looked up among the row's own
keys first and then inside its metadata, so ``epoch``, ``metrics.acc`` and ``metadata.step`` all work.

The ``--where`` language (docs/metadata.md has the grammar) is parsed by hand into a small tree and evaluated
against a row; nothing is ever passed to ``eval``. Errors point at the offending position.

>>> rows = select(store, "run", where="metrics.top1 > 0.5 and epoch >= 3", sort="-metrics.top1")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from ckptstore.errors import InvalidQueryError, MissingDependencyError
from ckptstore.metadata import decode

if TYPE_CHECKING:
    from ckptstore.store import Store

__all__ = [
    "Query",
    "checkpoint_rows",
    "dataframe",
    "expand_columns",
    "flatten",
    "get_path",
    "metric_names",
    "metrics_table",
    "parse_columns",
    "parse_path",
    "parse_sort",
    "parse_where",
    "select",
    "show",
    "sort_rows",
    "write_csv",
]

_MISSING = object()


# --------------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class _Tok:
    kind: str  # "name", "num", "str", "op", "(", ")", "[", "]", ",", ".", "end"
    text: str
    pos: int
    value: Any = None


_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null", "none"}
_OPERATOR_WORDS = {"and", "or", "not", "in"}
_OPS = ("==", "!=", "<=", ">=", "<>", "=", "<", ">")
_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-/@]*")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-/@]*")


def _err(text: str, pos: int, message: str, hint: str | None = None) -> InvalidQueryError:
    return InvalidQueryError(f"{message} at column {pos + 1}", expression=text, position=pos, hint=hint)


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in "'\"":
            j, buf = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise _err(text, i, "unterminated string", hint=f"close it with {c}")
            toks.append(_Tok("str", text[i : j + 1], i, "".join(buf)))
            i = j + 1
            continue
        prev = toks[-1] if toks else None
        adjacent = prev is not None and prev.pos + len(prev.text) == i
        if c == "." and adjacent and prev is not None and prev.kind in ("name", "]"):
            toks.append(_Tok(".", c, i))  # a path separator: lr.0, metrics.acc
            m = _SEGMENT_RE.match(text, i + 1)
            if m:  # the segment may start with a digit
                toks.append(_Tok("name", m.group(), i + 1, m.group()))
                i = m.end()
            else:
                i += 1
            continue
        m = _NUM_RE.match(text, i)
        operand_before = prev is not None and (
            prev.kind in ("num", "str", ")", "]") or (prev.kind == "name" and prev.text.lower() not in _OPERATOR_WORDS)
        )
        if m and (c.isdigit() or c == "." or not operand_before):
            toks.append(_Tok("num", m.group(), i, _number(m.group())))
            i = m.end()
            continue
        m = _NAME_RE.match(text, i)
        if m:
            toks.append(_Tok("name", m.group(), i, m.group()))
            i = m.end()
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is not None:
            toks.append(_Tok("op", op, i))
            i += len(op)
            continue
        if c in "()[],.":
            toks.append(_Tok(c, c, i))
            i += 1
            continue
        raise _err(text, i, f"unexpected character {c!r}")
    toks.append(_Tok("end", "", n))
    return toks


def _number(s: str) -> int | float:
    try:
        return int(s)
    except ValueError:
        return float(s)


# ---------------------------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Field:
    path: tuple[str | int, ...]
    text: str


@dataclass(frozen=True)
class ListOf:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Compare:
    op: str  # "==", "!=", "<", "<=", ">", ">=", "in", "not in"
    left: Any
    right: Any


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and", "or"
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Not:
    item: Any


Expr = Const | Field | ListOf | Compare | BoolOp | Not


class _Parser:
    """Recursive descent over::

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | compare
    compare := operand [(== | != | < | <= | > | >= | in | not in) operand]
    operand := NUMBER | STRING | true | false | null | path | "[" [operand ("," operand)*] "]" | "(" expr ")"
    path    := NAME ("." SEGMENT | "[" (STRING | INTEGER) "]")*
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def kw(self, word: str, offset: int = 0) -> bool:
        t = self.toks[min(self.i + offset, len(self.toks) - 1)]
        return t.kind == "name" and t.text.lower() == word

    def advance(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, message: str, tok: _Tok | None = None, hint: str | None = None) -> InvalidQueryError:
        t = tok or self.tok
        found = "the end of the expression" if t.kind == "end" else repr(t.text)
        return _err(self.text, t.pos, f"{message}, found {found}", hint)

    def parse(self) -> Expr:
        if self.tok.kind == "end":
            raise _err(self.text, 0, "empty expression", hint='e.g. "metrics.val_loss < 0.5 and epoch >= 3"')
        e = self.expr()
        if self.tok.kind != "end":
            raise self.fail("expected 'and', 'or' or the end", hint="join conditions with 'and' / 'or'")
        return e

    def expr(self) -> Expr:
        return self._joined("or", self.conj)

    def conj(self) -> Expr:
        return self._joined("and", self.unary)

    def _joined(self, word: str, operand: Callable[[], Expr]) -> Expr:
        """``operand (word operand)*``: one operand as it is, several as a BoolOp."""
        items = [operand()]
        while self.kw(word):
            self.advance()
            items.append(operand())
        return items[0] if len(items) == 1 else BoolOp(word, tuple(items))

    def unary(self) -> Expr:
        if self.kw("not") and not self.kw("in", 1):
            self.advance()
            return Not(self.unary())
        return self.compare()

    def compare(self) -> Expr:
        left = self.operand()
        t = self.tok
        if t.kind == "op":
            self.advance()
            op = {"=": "==", "<>": "!="}.get(t.text, t.text)
            return Compare(op, left, self.operand(f"expected a value after {t.text!r}"))
        if self.kw("in"):
            self.advance()
            return Compare("in", left, self.operand("expected a value or [list] after 'in'"))
        if self.kw("not") and self.kw("in", 1):
            self.advance()
            self.advance()
            return Compare("not in", left, self.operand("expected a value or [list] after 'not in'"))
        if isinstance(left, ListOf) or (isinstance(left, Const) and not isinstance(left.value, bool)):
            raise self.fail("expected a comparison after a constant", hint="compare it with a field, e.g. epoch >= 3")
        return left  # a bare field: true when present and truthy

    def operand(self, message: str = "expected a field, a number, a string or '('") -> Expr:
        t = self.tok
        if t.kind == "num":
            self.advance()
            return Const(t.value)
        if t.kind == "str":
            self.advance()
            return Const(t.value)
        if t.kind == "(":
            self.advance()
            e = self.expr()
            if self.tok.kind != ")":
                raise self.fail("expected ')'", hint=f"the '(' at column {t.pos + 1} is not closed")
            self.advance()
            return e
        if t.kind == "[":
            self.advance()
            items: list[Expr] = []
            if self.tok.kind != "]":
                items.append(self.operand())
                while self.tok.kind == ",":
                    self.advance()
                    items.append(self.operand())
            if self.tok.kind != "]":
                raise self.fail("expected ',' or ']' in the list")
            self.advance()
            return ListOf(tuple(items))
        if t.kind == "name":
            low = t.text.lower()
            if low in ("true", "false"):
                self.advance()
                return Const(low == "true")
            if low in ("null", "none"):
                self.advance()
                return Const(None)
            if low in _KEYWORDS:
                raise self.fail(message)
            return self.path()
        raise self.fail(message)

    def path(self) -> Field:
        first = self.advance()
        parts: list[str | int] = [first.text]
        end = first.pos + len(first.text)
        while True:
            t = self.tok
            if t.kind == "." and t.pos == end:
                self.advance()
                seg = self.tok
                if seg.kind != "name" or seg.pos != t.pos + 1:
                    raise _err(self.text, t.pos + 1, "expected a field name right after '.'")
                self.advance()
                # (digits past 18 stay a name: int() refuses 4,300+ of them, found by fuzzing; no list is that long)
                parts.append(int(seg.text) if seg.text.isdigit() and len(seg.text) <= 18 else seg.text)
                end = seg.pos + len(seg.text)
            elif t.kind == "[" and t.pos == end:
                self.advance()
                key = self.tok
                if key.kind == "str" or (key.kind == "num" and isinstance(key.value, int)):
                    self.advance()
                else:
                    raise self.fail("expected a quoted key or an integer index inside [ ]")
                close = self.tok
                if close.kind != "]":
                    raise self.fail("expected ']'")
                self.advance()
                parts.append(key.value)
                end = close.pos + 1
            else:
                break
        return Field(tuple(parts), self.text[first.pos : end])


MAX_EXPRESSION_LENGTH = 10_000  # characters of a --where/--sort/--columns text (fuzzing: 100 MB ones took minutes)


def _check_length(text: str, what: str) -> None:
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise InvalidQueryError(
            f"the {what} expression has {len(text):,} characters, more than {MAX_EXPRESSION_LENGTH:,}",
            expression=text[:200],
            hint="write a shorter one",
        )


def parse_where(text: str) -> Query:
    """Parse a ``--where`` expression (raises :class:`~ckptstore.errors.InvalidQueryError` pointing at the error)."""
    if not isinstance(text, str):
        raise InvalidQueryError(f"a --where expression is a string, got {type(text).__name__}")
    _check_length(text, "--where")
    try:
        return Query(text, _Parser(text).parse())
    except RecursionError:  # found by fuzzing: thousands of nested '(' or 'not' overflowed the parser's stack
        raise InvalidQueryError(
            "the --where expression is nested too deeply", expression=text[:200], hint="use fewer parentheses"
        ) from None


def parse_path(text: str) -> tuple[str | int, ...]:
    """A field path alone (``metrics.val_loss``, ``lr.0``, ``hparams["batch size"]``)."""
    p = _Parser(text)
    if p.tok.kind != "name" or p.tok.text.lower() in _KEYWORDS:
        raise p.fail("expected a field path", hint="e.g. metrics.val_loss or hparams.lr")
    f = p.path()
    if p.tok.kind != "end":
        raise p.fail("expected the end of the field path")
    return f.path


# ----------------------------------------------------------------------------------------------- evaluation
def get_path(row: Mapping[str, Any], path: Sequence[str | int]) -> Any:
    """The value at ``path`` in a row (its own keys first, then its metadata); None when absent."""
    v = _lookup(row, path)
    if v is _MISSING and isinstance(row.get("metadata"), Mapping):
        v = _lookup(row["metadata"], path)
    return None if v is _MISSING else v


def _lookup(node: Any, path: Sequence[str | int]) -> Any:
    for part in path:
        if isinstance(node, Mapping):
            node = node.get(str(part), _MISSING)
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        else:
            return _MISSING
        if node is _MISSING:
            return node
    return node


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    if _is_num(a) and _is_num(b):
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return type(a) is type(b) and bool(a == b)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if op in ("in", "not in"):
        if isinstance(b, list):
            hit = any(_equal(a, x) for x in b)
        elif isinstance(a, str) and isinstance(b, str | Mapping):  # substring, or a key of an object
            hit = a in b
        else:
            return op == "not in"
        return hit if op == "in" else not hit
    # ordering: numbers with numbers, strings with strings; anything else (null included) is false
    if not ((_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str))):
        return False
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


class Query:
    """A parsed ``--where`` expression; ``query(row)`` tells whether a row matches.

    Semantics: a missing field is ``null``; ``==``/``!=`` compare values (numbers numerically, ``1 == 1.0``);
    ``<``, ``<=``, ``>``, ``>=`` hold only between two numbers or two strings (so a missing metric or NaN never
    passes ``metrics.acc > 0.5``); ``x in [..]`` tests membership, ``"release" in tags`` list membership,
    ``"clip" in model`` substring; a bare field is true when present and not false/0/empty.
    """

    def __init__(self, text: str, tree: Expr) -> None:
        self.text = text
        self.tree = tree

    def __repr__(self) -> str:
        return f"Query({self.text!r})"

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return bool(self._truth(self.tree, row))

    def fields(self) -> list[str]:
        out: list[str] = []

        def walk(e: Any) -> None:
            if isinstance(e, Field):
                out.append(e.text)
            for child in getattr(e, "items", ()) or ():
                walk(child)
            for attr in ("left", "right", "item"):
                if hasattr(e, attr):
                    walk(getattr(e, attr))

        walk(self.tree)
        return out

    def _value(self, e: Expr, row: Mapping[str, Any]) -> Any:
        if isinstance(e, Const):
            return e.value
        if isinstance(e, Field):
            return get_path(row, e.path)
        if isinstance(e, ListOf):
            return [self._value(x, row) for x in e.items]
        return self._truth(e, row)

    def _truth(self, e: Expr, row: Mapping[str, Any]) -> bool:
        if isinstance(e, BoolOp):
            if e.op == "and":
                return all(self._truth(x, row) for x in e.items)
            return any(self._truth(x, row) for x in e.items)
        if isinstance(e, Not):
            return not self._truth(e.item, row)
        if isinstance(e, Compare):
            return _compare(e.op, self._value(e.left, row), self._value(e.right, row))
        v = self._value(e, row)
        if isinstance(v, float) and math.isnan(v):
            return False
        return bool(v)


# -------------------------------------------------------------------------------------------- sort, columns
def parse_sort(spec: str | Sequence[str] | None) -> list[tuple[tuple[str | int, ...], bool]]:
    """``"-metrics.val_loss,step"`` → [(path, descending)]; a leading ``-`` or a ``:desc`` suffix sorts down."""
    if not spec:
        return []
    if isinstance(spec, str):
        _check_length(spec, "--sort")
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        key = item.strip()
        desc = False
        if key.startswith("-"):
            key, desc = key[1:].strip(), True
        elif key.startswith("+"):
            key = key[1:].strip()
        low = key.lower()
        for suffix, d in ((":desc", True), (":asc", False)):
            if low.endswith(suffix):
                key, desc = key[: -len(suffix)].strip(), d
        if not key:
            raise InvalidQueryError("empty sort key", expression=str(spec), hint="e.g. --sort -metrics.acc,step")
        try:
            out.append((parse_path(key), desc))
        except InvalidQueryError as exc:
            raise InvalidQueryError(
                f"bad sort key {item.strip()[:80]!r}: {exc.message}",
                expression=key,
                position=exc.position,
                hint=exc.hint,
            ) from None
    return out


def sort_rows(rows: Iterable[Mapping[str, Any]], spec: str | Sequence[str] | None) -> list[Any]:
    """Rows sorted by the keys of ``spec`` in order; missing values and NaN go last in either direction;
    numbers sort before strings."""
    keys = parse_sort(spec)
    rows = list(rows)

    def rank(v: Any) -> tuple[int, Any]:
        if _is_num(v) and not (isinstance(v, float) and math.isnan(v)):
            return (0, v)
        if isinstance(v, bool):
            return (0, int(v))
        if isinstance(v, str):
            return (1, v)
        return (2, 0)

    def cmp(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
        for path, desc in keys:
            ra, rb = rank(get_path(a, path)), rank(get_path(b, path))
            if ra[0] != rb[0]:
                return -1 if ra[0] < rb[0] else 1
            if ra[1] != rb[1]:
                less = ra[1] < rb[1]
                return (1 if less else -1) if desc else (-1 if less else 1)
        return 0

    return sorted(rows, key=functools.cmp_to_key(cmp)) if keys else rows


def parse_columns(spec: str | Sequence[str] | None) -> list[str]:
    """``"ref,epoch,metrics.*"`` → ["ref", "epoch", "metrics.*"] (each checked as a path; ``X.*`` expands later)."""
    if not spec:
        return []
    if isinstance(spec, str):
        _check_length(spec, "--columns")
    items = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec)]
    for c in items:
        if not c:
            raise InvalidQueryError(
                "empty column name", expression=str(spec), hint="e.g. --columns ref,epoch,metrics.*"
            )
        try:
            parse_path(c[:-2] if c.endswith(".*") else c)
        except InvalidQueryError as exc:
            raise InvalidQueryError(
                f"bad column {c[:80]!r}: {exc.message}", expression=c, position=exc.position, hint=exc.hint
            ) from None
    return items


def expand_columns(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Replace each ``X.*`` by ``X.<key>`` for every key X has in any row (sorted)."""
    out: list[str] = []
    for c in columns:
        if c.endswith(".*"):
            base = parse_path(c[:-2])
            keys = sorted({k for r in rows if isinstance(v := get_path(r, base), Mapping) for k in v})
            out.extend(f"{c[:-2]}.{k}" if _SEGMENT_RE.fullmatch(k) else f"{c[:-2]}[{k!r}]" for k in keys)
        else:
            out.append(c)
    return list(dict.fromkeys(out))


def project(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Each row reduced to ``{column: value}`` (None where absent)."""
    paths = [(c, parse_path(c)) for c in columns]
    return [{c: get_path(r, p) for c, p in paths} for r in rows]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists stay values): ``{"metrics": {"a": 1}}`` → ``{"metrics.a": 1}``."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping) and (value or not prefix):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = value
    return out


# ------------------------------------------------------------------------------------------------ the store
def checkpoint_rows(store: Store, run: str | None = None) -> list[dict[str, Any]]:
    """One plain row per checkpoint (every run, or one), in run and step order, metadata decoded."""
    rows = []
    for info in store.checkpoints(run):
        row = info.as_dict()
        row["metadata"] = decode(info.metadata)
        rows.append(row)
    return rows


def select(
    store: Store,
    run: str | None = None,
    *,
    where: str | Query | None = None,
    sort: str | Sequence[str] | None = None,
    columns: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the checkpoints matching ``where``, sorted, at most ``limit``; reduced to ``columns`` if given.

    Everything is checked before the store is read, so a typo fails fast.
    """
    query = parse_where(where) if isinstance(where, str) else where
    cols = parse_columns(columns)
    parse_sort(sort)
    rows = checkpoint_rows(store, run)
    _check_known(rows, [c[:-2] if c.endswith(".*") else c for c in cols], "column")
    _check_known(rows, [".".join(map(str, path)) for path, _ in parse_sort(sort)], "sort key")
    if query is not None:
        rows = [r for r in rows if query(r)]
    rows = sort_rows(rows, sort)
    if limit is not None:
        rows = rows[: max(0, limit)]
    return project(rows, expand_columns(cols, rows)) if cols else rows


def _check_known(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], what: str) -> None:
    """A column or sort key that no checkpoint has is a typo, not an empty column: say so (with the fields
    there are)."""
    if not rows:
        return
    for field in fields:
        path = parse_path(field)
        if str(path[0]) in rows[0] and len(path) == 1:
            continue
        if any(get_path(r, path) is not None for r in rows):
            continue
        known = sorted({k for r in rows for k in r if k != "metadata"} | {
            k for r in rows for k in (r.get("metadata") or {}) if k not in ("schema",)})  # fmt: skip
        raise InvalidQueryError(f"unknown {what} {field!r}: no checkpoint has it", expression=field,
                                hint="fields: " + ", ".join(known))  # fmt: skip


def dataframe(
    store: Store,
    run: str | None = None,
    *,
    where: str | Query | None = None,
    sort: str | Sequence[str] | None = None,
    columns: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> Any:
    """:func:`select` as a pandas DataFrame: the chosen columns, or every row key and flattened metadata field
    (``metrics.val_loss``, ``hparams.lr`` ...) when ``columns`` is not given."""
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("a DataFrame needs pandas", hint="pip install pandas") from None
    rows = select(store, run, where=where, sort=sort, columns=columns, limit=limit)
    if columns:
        return pd.DataFrame(rows, columns=list(rows[0]) if rows else parse_columns(columns))
    flat = []
    for r in rows:
        base = {k: v for k, v in r.items() if k != "metadata"}
        meta = {k: v for k, v in flatten(r["metadata"]).items() if k not in base}
        flat.append({**base, **meta})
    return pd.DataFrame(flat)


def show(store: Store, ref: str) -> dict[str, Any]:
    """One checkpoint as plain data: its row (metadata decoded) plus the tensor count and names."""
    m = store.resolve(ref)
    row = next(r for r in checkpoint_rows(store, m.run) if r["step"] == m.step)
    row["tensor_names"] = list(m.tensors)
    return row


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every metric name that appears in any row, sorted."""
    return sorted({k for r in rows if isinstance(m := get_path(r, ("metrics",)), Mapping) for k in m})


def metrics_table(store: Store, run: str, *, where: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """The per-checkpoint metric table of a run: columns ``ref, step, epoch`` (+ ``metadata.step`` when the
    training step differs from the store's, ``samples_seen`` and ``loss.last`` when recorded) + one per metric, and
    one row (``{column: value}``) per checkpoint in step order."""
    rows = select(store, run, where=where)
    cols = ["ref", "step", "epoch"]
    if any(_is_num(r["metadata"].get("step")) and r["metadata"]["step"] != r["step"] for r in rows):
        cols.insert(2, "metadata.step")  # the training step, where the store keys checkpoints otherwise
    for extra in ("samples_seen", "loss.last"):
        if any(get_path(r, parse_path(extra)) is not None for r in rows):
            cols.append(extra)
    cols += expand_columns(["metrics.*"], rows)
    return cols, project(rows, cols)


def write_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], out: IO[str] | None = None) -> str:
    """Rows as CSV (header = column names; floats at full precision; empty cell = missing); returns the text
    when ``out`` is None."""
    buf = out if out is not None else io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else _cell(r.get(c)) for c in columns])
    return buf.getvalue() if isinstance(buf, io.StringIO) else ""


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | dict):
        import json

        return json.dumps(v, allow_nan=True)
    return v


def format_value(v: Any) -> str:
    """A cell for a terminal table: floats to 6 significant digits, missing as ``-``, lists comma-joined."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ",".join(format_value(x) for x in v)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(x)}" for k, x in v.items()) + "}"
    return str(v)
