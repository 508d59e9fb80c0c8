"""What untraced code does with the model's modules: the records the reader collects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

CALL = "call"
REACH = "reach"
READ = "read"  # a reach that reads a parameter or buffer
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Use:
    """One use of a module by code outside the traced parts."""

    module: str  # qualified name ("" for the model's root)
    kind: str  # CALL, REACH, READ or UNREADABLE
    code: str  # the function that uses it, e.g. "Model.forward"
    how: str  # what it does, e.g. "calls self.a.bn"
    subtree: bool = True  # REACH: also the modules below it (False: only its own tensors)

    @property
    def detail(self) -> str:
        return f"{self.code} {self.how}"


@dataclass
class CodeUse:
    """Every use found so far, one per (module, kind, subtree)."""

    uses: dict[tuple[str, str, bool], Use] = field(default_factory=dict)

    def add(self, use: Use) -> None:
        key = (use.module, use.kind, use.subtree)
        known = self.uses.get(key)
        if known is None or (use.code, use.how) < (known.code, known.how):  # the same whatever order code is read in
            self.uses[key] = use

    def calls_below(self, name: str) -> bool:
        """Whether some module strictly below ``name`` is called (or used) by code read so far."""
        prefix = name + "." if name else ""
        return any(u.module.startswith(prefix) and u.module != name for u in self.uses.values())

    def called(self, name: str) -> bool:
        return (name, CALL, True) in self.uses


_KIND_ORDER = (CALL, READ, REACH, UNREADABLE)


def at_or_under(name: str, above: str) -> bool:
    return above == "" or name == above or name.startswith(above + ".")


def first_reach(uses: CodeUse | None, names: Iterable[str], part: str) -> Use | None:
    """The first use that makes a fold of modules ``names``, found in the part traced at ``part``,
    unsafe: a call of a module strictly inside the part at or above one of them, a reach into one
    of them, or code that could not be read above one of them."""
    if uses is None:
        return None
    names = list(names)
    found = []
    for use in uses.uses.values():
        if use.kind == CALL:
            inside = use.module != part and at_or_under(use.module, part)
            hit = inside and any(at_or_under(n, use.module) for n in names)
        elif use.kind == UNREADABLE:
            hit = any(at_or_under(n, use.module) for n in names)
        else:
            hit = any(n == use.module or (use.subtree and at_or_under(n, use.module)) for n in names)
        if hit:
            found.append(use)
    # the most specific first (a call, then a read, ...), then by name: the same on every run
    return min(found, key=lambda u: (_KIND_ORDER.index(u.kind), -u.module.count("."), u.module, u.code, u.how),
               default=None)


