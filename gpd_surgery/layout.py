"""Channel spaces: a union-find over atoms, with products and concatenations.

Every tensor dimension of the traced graph (and of every parameter) is described
by a *layout*: an atom (an index into :class:`Spaces`), a row-major product of
layouts (``C = heads x head_dim``, ``C*H*W`` after flatten) or a concatenation
(``torch.cat`` along channels). Rules *unify* layouts that must be indexed the
same way; unification refines atoms into products or concatenations when the
other side is structured, and freezes both sides when the structures cannot be
reconciled (always correct, it only widens less).

An atom is *expandable* when a rule said it may widen (the output channels of a
conv, the heads of an attention), *frozen* when something needs its size kept
(graph inputs and outputs, an op no rule understands), neutral otherwise. Only
expandable atoms that are not frozen are widened; everything else keeps the
identity map, which keeps both invariants trivially.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Prod:
    parts: tuple["Layout", ...]


@dataclass(frozen=True)
class Cat:
    parts: tuple["Layout", ...]


Layout = Union[int, Prod, Cat]

BOUNDARY = "graph boundary"
DESIGN = "by design"  # prefix of deliberate freezes (spatial dims, head_dim, channels within a group)


def leaf_ids(lay: Layout) -> list[int]:
    """The atoms of a layout as written (a plan's layouts are resolved already), in order."""
    return [lay] if isinstance(lay, int) else [i for p in lay.parts for i in leaf_ids(p)]  # prefix of freeze reasons that are expected, not a loss of width


class Spaces:
    """Union-find over atoms; roots may carry a structured definition."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.expandable: list[bool] = []
        self.frozen: list[str | None] = []
        self.definition: dict[int, Layout] = {}
        self.wants: list[Layout] = []  # products that should widen by one factor, decided in finalize()
        # Atoms offered to widen other than by ``expandable``: the factors of a wanted product that no factor
        # could widen, and the spaces an unsupported op froze. Reported where frozen, never widened.
        self.offered: set[int] = set()
        # Roots that a deliberate freeze touched, whatever froze them first (a rotary embedding's strided
        # slice of head_dim before the product q @ k contracts it): never reported as offered.
        self.designed: set[int] = set()

    # -- atoms -------------------------------------------------------------
    def new(self, size: int, *, expandable: bool = False, frozen: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.expandable.append(expandable and size > 1)
        self.frozen.append(frozen)
        return i

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    # -- structure ---------------------------------------------------------
    def resolve(self, lay: Layout) -> Layout:
        """Normal form: definitions substituted, nests flattened, size-1 factors dropped."""
        if isinstance(lay, int):
            r = self.find(lay)
            d = self.definition.get(r)
            return r if d is None else self.resolve(d)
        parts: list[Layout] = []
        kind = type(lay)
        for p in lay.parts:
            q = self.resolve(p)
            if isinstance(q, kind):
                parts.extend(q.parts)
            elif kind is Prod and self.size_of(q) == 1:
                continue
            elif kind is Cat and self.size_of(q) == 0:
                continue
            else:
                parts.append(q)
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self.new(1)
        return kind(tuple(parts))

    def size_of(self, lay: Layout) -> int:
        if isinstance(lay, int):
            return self.size[self.find(lay)]
        sizes = [self.size_of(p) for p in lay.parts]
        if isinstance(lay, Cat):
            return sum(sizes)
        out = 1
        for s in sizes:
            out *= s
        return out

    def leaves(self, lay: Layout) -> list[int]:
        lay = self.resolve(lay)
        if isinstance(lay, int):
            return [lay]
        return [leaf for p in lay.parts for leaf in self.leaves(p)]

    def freeze(self, lay: Layout, reason: str) -> None:
        for leaf in self.leaves(lay):
            if self.frozen[leaf] is None:
                self.frozen[leaf] = reason
            if reason.startswith(DESIGN):
                self.designed.add(leaf)

    def mark_expandable(self, lay: Layout) -> None:
        """Allow a layout to widen: every part of a concatenation; one factor of a product (see finalize)."""
        lay = self.resolve(lay)
        if isinstance(lay, int):
            self.expandable[lay] = self.expandable[lay] or self.size[lay] > 1
        elif isinstance(lay, Cat):
            for p in lay.parts:
                self.mark_expandable(p)
        else:
            self.wants.append(lay)

    def finalize(self) -> None:
        """Products that should widen and where no rule chose a factor (heads, groups) widen their innermost
        factor that is not frozen: one factor only, so a product grows by the ratio, not its power. Where
        every factor is frozen, the factors are offered, so that the report says what froze them."""
        for lay in self.wants:
            lay = self.resolve(lay)
            if not self._widen_one(lay):
                self.offered.update(leaf for leaf in self.leaves(lay) if self.size[leaf] > 1)

    def _widen_one(self, lay: Layout) -> bool:
        """Widen one factor of ``lay`` (or see that one is widened already): whether one could."""
        lay = self.resolve(lay)
        if not isinstance(lay, Prod):
            self.mark_expandable(lay)
            return any(self.is_expanded(leaf) for leaf in self.leaves(lay))
        if any(self.is_expanded(leaf) for leaf in self.leaves(lay)):
            return True
        for part in reversed(lay.parts):
            if any(self.frozen[leaf] is None and self.size[leaf] > 1 for leaf in self.leaves(part)):
                return self._widen_one(part)
        return False

    def is_expanded(self, atom: int) -> bool:
        r = self.find(atom)
        return self.expandable[r] and self.frozen[r] is None and self.size[r] > 1

    # -- unification -------------------------------------------------------
    def unify(self, a: Layout, b: Layout, where: str) -> None:
        A, B = self.resolve(a), self.resolve(b)
        if A == B:
            return
        if self.size_of(A) != self.size_of(B):
            raise ValueError(f"internal: unifying sizes {self.size_of(A)} and {self.size_of(B)} at {where}")
        if isinstance(A, int) and isinstance(B, int):
            self._union(A, B)
        elif isinstance(A, int):
            self._bind(A, B, where)
        elif isinstance(B, int):
            self._bind(B, A, where)
        elif isinstance(A, Prod) and isinstance(B, Prod):
            self._align(list(A.parts), list(B.parts), Prod, where)
        elif isinstance(A, Cat) and isinstance(B, Cat):
            self._align(list(A.parts), list(B.parts), Cat, where)
        elif isinstance(A, Prod):
            self._distribute(A, B, where)  # type: ignore[arg-type]
        else:
            self._distribute(B, A, where)  # type: ignore[arg-type]

    def _union(self, a: int, b: int) -> None:
        self.parent[b] = a
        self.expandable[a] = self.expandable[a] or self.expandable[b]
        self.frozen[a] = self.frozen[a] if self.frozen[a] is not None else self.frozen[b]
        if b in self.designed:
            self.designed.add(a)

    def _bind(self, atom: int, lay: Layout, where: str) -> None:
        if atom in self.leaves(lay):
            self._fail(atom, lay, where)
            return
        self.definition[atom] = lay
        if self.frozen[atom] is not None:
            self.freeze(lay, self.frozen[atom])  # type: ignore[arg-type]
        if atom in self.designed:
            self.designed.update(self.leaves(lay))
        if self.expandable[atom]:
            self.mark_expandable(lay)

    def _pop(self, parts: list[Layout], kind: type) -> Layout | None:
        while parts:
            x = self.resolve(parts.pop(0))
            if isinstance(x, kind):
                parts[0:0] = list(x.parts)
                continue
            size = self.size_of(x)
            if (kind is Prod and size == 1) or (kind is Cat and size == 0):
                continue
            return x
        return None

    def _align(self, pa: list[Layout], pb: list[Layout], kind: type, where: str) -> None:
        """Unify two products (or two concatenations) part by part, splitting parts where boundaries differ."""
        whole_a, whole_b = kind(tuple(pa)), kind(tuple(pb))
        x, y = self._pop(pa, kind), self._pop(pb, kind)
        while x is not None and y is not None:
            sx, sy = self.size_of(x), self.size_of(y)
            if sx == sy:
                self.unify(x, y, where)
                x, y = self._pop(pa, kind), self._pop(pb, kind)
                continue
            small, big, rest_of_big = (x, y, pb) if sx < sy else (y, x, pa)
            s, S = min(sx, sy), max(sx, sy)
            if kind is Prod and S % s:
                self._fail(whole_a, whole_b, where)
                return
            head, tail = self.new(s), self.new(S // s if kind is Prod else S - s)
            self.unify(big, kind((head, tail)), where)
            self.unify(small, head, where)
            rest_of_big.insert(0, tail)
            x, y = self._pop(pa, kind), self._pop(pb, kind)

    def _distribute(self, prod: Prod, cat: Cat, where: str) -> None:
        """Prod(f, rest) ~ Cat(parts): split f along the parts' boundaries, then match part by part."""
        first, rest = prod.parts[0], prod.parts[1:]
        rest_size = self.size_of(Prod(rest)) if rest else 1
        sizes = [self.size_of(p) for p in cat.parts]
        if any(s % rest_size for s in sizes):
            self._fail(prod, cat, where)
            return
        first = self.resolve(first)
        if isinstance(first, Cat):
            self.unify(Cat(tuple(Prod((c, *rest)) for c in first.parts)), cat, where)
            return
        pieces = tuple(self.new(s // rest_size) for s in sizes)
        self.unify(first, Cat(pieces), where)
        for piece, part in zip(pieces, cat.parts):
            self.unify(Prod((piece, *rest)), part, where)

    def _fail(self, a: Layout, b: Layout, where: str) -> None:
        # Where one side is frozen already (e.g. spatial dims factored two ways), the other side inherits
        # that reason: nothing is lost that was not lost already.
        reason = f"incompatible channel layouts at {where}"
        for side in (a, b):
            reasons = {self.frozen[leaf] for leaf in self.leaves(side)}
            if None not in reasons:
                reason = sorted(reasons)[0]  # type: ignore[type-var]
                break
        self.freeze(a, reason)
        self.freeze(b, reason)
