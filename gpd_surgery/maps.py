"""Index maps: for every layout, which student channel each teacher channel copies.

A leaf space of student size C has a source map ``src`` of length C' (its
teacher size): teacher channel j copies student channel ``src[j]``. At an
integer ratio r the map is the tile ``src[k*C + c] = c``, so the first C
teacher channels are the student's; at a fractional ratio every channel gets
``floor(r)`` copies and a seeded choice of channels one more. Products and
concatenations of spaces combine their parts' maps. All maps are int64 tensors,
built by broadcasting, never by loops over channels.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .layout import Cat, Layout


def teacher_size(size: int, ratio: float) -> int:
    return max(size, int(math.floor(ratio * size + 0.5)))


def leaf_src(size: int, ratio: float, seed: int, leaf: int) -> torch.Tensor:
    """Source map of one expanded space: whole tiles, then a seeded choice of channels that get one more copy."""
    t = teacher_size(size, ratio)
    tiles, extra = divmod(t, size)
    src = torch.arange(size).repeat(tiles)
    if extra:
        g = torch.Generator().manual_seed(seed * 1_000_003 + leaf)
        chosen = torch.randperm(size, generator=g)[:extra].sort().values
        src = torch.cat([src, chosen])
    return src


class Maps:
    """Sizes and source maps of layouts over a table of leaves ``id -> (size, src or None)``."""

    def __init__(
        self,
        leaves: dict[int, tuple[int, torch.Tensor | None]],
        resolve: Callable[[Layout], Layout] = lambda lay: lay,
        make_leaf: Callable[[int], tuple[int, torch.Tensor | None]] | None = None,
    ) -> None:
        self.leaves = leaves
        self._resolve = resolve
        self._make_leaf = make_leaf
        self._cache: dict[Layout, torch.Tensor | None] = {}
        self._derived: dict[tuple, object] = {}  # canonical maps, tile counts, maps moved to a device

    def leaf(self, i: int) -> tuple[int, torch.Tensor | None]:
        if i not in self.leaves:
            if self._make_leaf is None:
                raise KeyError(i)
            self.leaves[i] = self._make_leaf(i)
        return self.leaves[i]

    def resolve(self, lay: Layout) -> Layout:
        return self._resolve(lay)

    def size(self, lay: Layout) -> int:
        lay = self._resolve(lay)
        if isinstance(lay, int):
            return self.leaf(lay)[0]
        sizes = [self.size(p) for p in lay.parts]
        return sum(sizes) if isinstance(lay, Cat) else math.prod(sizes)

    def tsize(self, lay: Layout) -> int:
        lay = self._resolve(lay)
        if isinstance(lay, int):
            size, src = self.leaf(lay)
            return size if src is None else len(src)
        sizes = [self.tsize(p) for p in lay.parts]
        return sum(sizes) if isinstance(lay, Cat) else math.prod(sizes)

    def src(self, lay: Layout, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Source map of a layout, or None where it is the identity (on ``device`` when given, cached)."""
        out = self._src(lay)
        if device is None or out is None or torch.device(device) == out.device:
            return out
        key = ("src", self._resolve(lay), None)
        self._derived.setdefault(key, out)
        return self._on(key, device)

    def _src(self, lay: Layout) -> torch.Tensor | None:
        lay = self._resolve(lay)
        if lay in self._cache:
            return self._cache[lay]
        if isinstance(lay, int):
            out = self.leaf(lay)[1]
        else:
            maps = [self._src(p) for p in lay.parts]
            if all(m is None for m in maps):
                out = None
            else:
                full = [torch.arange(self.size(p)) if m is None else m for p, m in zip(lay.parts, maps)]
                if isinstance(lay, Cat):
                    offsets = [0]
                    for p in lay.parts[:-1]:
                        offsets.append(offsets[-1] + self.size(p))
                    out = torch.cat([m + o for m, o in zip(full, offsets)])
                else:
                    out = full[0]
                    for p, m in zip(lay.parts[1:], full[1:]):
                        out = (out[:, None] * self.size(p) + m[None, :]).reshape(-1)
        self._cache[lay] = out
        return out

    def canon(self, lay: Layout, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Index of the canonical (first) copy of every student channel, or None for the identity."""
        key = ("canon", self._resolve(lay), None)
        if key not in self._derived:
            src = self.src(lay)
            self._derived[key] = None if src is None else canonical(src, self.size(lay))
        return self._on(key, device)

    def tiles(self, lay: Layout) -> int:
        """``n`` when the map is ``n >= 2`` whole tiles of the student's channels in order, else 0."""
        key = ("tiles", self._resolve(lay))
        if key not in self._derived:
            src = self.src(lay)
            self._derived[key] = 0 if src is None else whole_tiles(src, self.size(lay))
        return self._derived[key]  # type: ignore[return-value]

    def canon_is_prefix(self, lay: Layout) -> bool:
        """Whether the canonical copies are the first teacher channels, in order (then collapse takes a slice)."""
        key = ("prefix", self._resolve(lay))
        if key not in self._derived:
            canon = self.canon(lay)
            self._derived[key] = canon is not None and torch.equal(canon, torch.arange(len(canon)))
        return self._derived[key]  # type: ignore[return-value]

    def _on(self, key: tuple, device: torch.device | str | None) -> torch.Tensor | None:
        t = self._derived[key]
        if device is None or t is None or torch.device(device) == t.device:  # type: ignore[union-attr]
            return t  # type: ignore[return-value]
        moved = key[:2] + (torch.device(device),)
        if moved not in self._derived:
            self._derived[moved] = t.to(device)  # type: ignore[union-attr]
        return self._derived[moved]  # type: ignore[return-value]


def whole_tiles(src: torch.Tensor, size: int) -> int:
    """``n`` when ``src`` is ``n >= 2`` whole tiles of the ``size`` student channels in order, else 0."""
    n = len(src) // size if size else 0
    every = torch.arange(size, device=src.device)
    return n if n >= 2 and len(src) == n * size and torch.equal(src.view(n, size), every.expand(n, size)) else 0


def canonical(src: torch.Tensor, size: int) -> torch.Tensor:
    pos = torch.arange(len(src), device=src.device)
    first = torch.full((size,), len(src), dtype=torch.long, device=src.device)
    return first.scatter_reduce(0, src, pos, reduce="amin")


