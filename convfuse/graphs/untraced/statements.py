"""How the reader follows statements: blocks, imports, assignments."""

from __future__ import annotations

import ast
import importlib.util
import sys

from convfuse.graphs.untraced.frames import (
    Frame,
)
from convfuse.graphs.untraced.values import (
    NOTHING,
    ONLY_DATA,
    External,
    Known,
    Mods,
    Nested,
    Seq,
    Tup,
    bounded,
    one,
)


class Statements:
    # -- statements --------------------------------------------------------------------------

    def _block(self, body: list[ast.stmt], frame: Frame) -> None:
        for stmt in body:
            self._stmt(stmt, frame)

    def _stmt(self, stmt: ast.stmt, frame: Frame) -> None:
        if isinstance(stmt, ast.Expr):
            self._ev(stmt.value, frame)
        elif isinstance(stmt, ast.Assign):
            values = self._ev(stmt.value, frame)
            for target in stmt.targets:
                self._assign(target, values, frame)
        elif isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                self._assign(stmt.target, self._ev(stmt.value, frame), frame)
        elif isinstance(stmt, ast.AugAssign):
            values = self._ev(stmt.value, frame)
            if isinstance(stmt.op, ast.Add):  # list += [...] keeps the items
                old = self._ev(stmt.target, frame)
                self._assign(stmt.target, old | values | one(Seq(self._items(values, frame))), frame)
            else:
                self._consume(values | self._ev(stmt.target, frame), frame, "strict")
                self._assign(stmt.target, ONLY_DATA, frame)
        elif isinstance(stmt, ast.Return):
            frame.returns.update(bounded(self._ev(stmt.value, frame)) if stmt.value is not None else ONLY_DATA)
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            self._assign(stmt.target, self._items(self._ev(stmt.iter, frame), frame), frame)
            self._block(stmt.body, frame)
            self._block(stmt.orelse, frame)
        elif isinstance(stmt, (ast.While, ast.If)):
            self._consume(self._ev(stmt.test, frame), frame, "truth")
            self._block(stmt.body, frame)
            self._block(stmt.orelse, frame)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                self._ev(item.context_expr, frame)
                if item.optional_vars is not None:
                    self._assign(item.optional_vars, ONLY_DATA, frame)
            self._block(stmt.body, frame)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            self._block(stmt.body, frame)
            for handler in stmt.handlers:
                if handler.type is not None:
                    self._ev(handler.type, frame)
                if handler.name:
                    frame.scope.bind(handler.name, ONLY_DATA)
                self._block(handler.body, frame)
            self._block(stmt.orelse, frame)
            self._block(stmt.finalbody, frame)
        elif isinstance(stmt, ast.Raise):
            for part in (stmt.exc, stmt.cause):
                if part is not None:
                    self._consume(self._ev(part, frame), frame, "strict")
        elif isinstance(stmt, ast.Assert):
            self._consume(self._ev(stmt.test, frame), frame, "truth")
            if stmt.msg is not None:
                self._consume(self._ev(stmt.msg, frame), frame, "compare")
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                if isinstance(target, (ast.Attribute, ast.Subscript)):
                    self._reach_values(self._ev(target.value, frame), frame, "deletes an attribute of", True)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self._import(stmt, frame)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in stmt.decorator_list:
                self._ev(decorator, frame)
            frame.scope.bind(stmt.name, one(Nested(stmt, frame.scope, frame.func, frame.self_values, frame.defining)))
        elif isinstance(stmt, ast.ClassDef):
            frame.scope.bind(stmt.name, ONLY_DATA)
        elif isinstance(stmt, ast.Match):
            subject = self._ev(stmt.subject, frame)
            captured = subject | self._items(subject, frame)
            for case in stmt.cases:
                for item in ast.walk(case.pattern):
                    if isinstance(item, (ast.MatchAs, ast.MatchStar)) and item.name:
                        frame.scope.bind(item.name, captured)
                    elif isinstance(item, ast.MatchMapping) and item.rest:
                        frame.scope.bind(item.rest, captured)
                    elif isinstance(item, ast.MatchValue):
                        self._ev(item.value, frame)
                if case.guard is not None:
                    self._consume(self._ev(case.guard, frame), frame, "truth")
                self._block(case.body, frame)
        # Pass, Break, Continue, Global, Nonlocal: nothing to read

    def _import(self, stmt: ast.Import | ast.ImportFrom, frame: Frame) -> None:
        """Bind imported names to what is loaded already; nothing is imported by reading."""
        package = getattr(frame.func.obj, "__module__", None) or ""
        for alias in stmt.names:
            if alias.name == "*":
                continue
            if isinstance(stmt, ast.Import):
                bound = alias.asname or alias.name.split(".")[0]
                target = alias.name if alias.asname else alias.name.split(".")[0]
                loaded = sys.modules.get(target)
                frame.scope.bind(bound, one(Known(loaded)) if loaded is not None else one(External(target)))
                continue
            try:
                base = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), package) \
                    if stmt.level else (stmt.module or "")
            except (ImportError, ValueError):
                base = stmt.module or ""
            bound = alias.asname or alias.name
            loaded = sys.modules.get(base)
            if loaded is not None and hasattr(loaded, alias.name):
                frame.scope.bind(bound, self._lift(getattr(loaded, alias.name)))
            elif f"{base}.{alias.name}" in sys.modules:
                frame.scope.bind(bound, one(Known(sys.modules[f"{base}.{alias.name}"])))
            else:
                frame.scope.bind(bound, one(External(f"{base}.{alias.name}")))

    def _assign(self, target: ast.expr, values: frozenset, frame: Frame) -> None:
        if isinstance(target, ast.Name):
            frame.scope.bind(target.id, values)
        elif isinstance(target, (ast.Tuple, ast.List)):
            count = len(target.elts)
            for index, element in enumerate(target.elts):
                if isinstance(element, ast.Starred):
                    self._assign(element.value, one(Seq(self._items(values, frame))), frame)
                    continue
                parts: set = set()
                for value in values:
                    if isinstance(value, Tup) and len(value.items) == count:
                        parts |= value.items[index]
                    else:
                        parts |= self._items(one(value), frame)
                self._assign(element, frozenset(parts) or ONLY_DATA, frame)
        elif isinstance(target, ast.Starred):
            self._assign(target.value, one(Seq(self._items(values, frame))), frame)
        elif isinstance(target, ast.Attribute):
            self._store_attribute(self._ev(target.value, frame), target.attr, values, frame)
        elif isinstance(target, ast.Subscript):
            self._consume(self._ev(target.slice, frame), frame, "compare")
            self._store_item(target.value, values, frame)

    def _store_attribute(self, owners: frozenset, attr: str, values: frozenset, frame: Frame) -> None:
        for owner in owners:
            if isinstance(owner, Mods):
                for name in owner.names:
                    if attr in self.modules[name]._parameters or attr in self.modules[name]._buffers:
                        self._reach(name, frame, f"assigns {self._show(name, frame)}.{attr}", False)
                    key = (name, attr)
                    old = self._aliases.get(key, NOTHING)
                    new = old | bounded(values)
                    if new != old:
                        self._aliases[key] = new
                        self._version += 1
            else:  # kept on an object this reader does not follow: anything may use it later
                self._consume(values, frame, "stores", reach=True)

    def _store_item(self, container: ast.expr, values: frozenset, frame: Frame) -> None:
        """``items[k] = v`` or ``items.append(v)``: the container now also holds ``values``."""
        added = one(Seq(values))
        if isinstance(container, ast.Name):
            frame.scope.bind(container.id, added)
            return
        if isinstance(container, ast.Attribute):
            owners = self._ev(container.value, frame)
            if all(isinstance(o, Mods) for o in owners):
                self._store_attribute(owners, container.attr, added, frame)
                return
        held = self._ev(container, frame)
        if any(isinstance(v, Mods) for v in held):  # a module container changed by code
            self._reach_values(frozenset(v for v in held if isinstance(v, Mods)), frame, "changes", True)
        self._consume(values, frame, "stores", reach=True)

