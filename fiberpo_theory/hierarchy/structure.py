"""Fibration hierarchies on finite sets (paper Def. 6.1, Eq. 21-25; Remark 6.5).

A hierarchy is a set of *strata* (finite sets) linked by fibrations.  The
total space (the tokens) is the finest stratum; every other stratum ``v``
coarsens exactly one finer stratum ``finer[v]`` through a surjection
``π_v: finer[v] → v``.  A linear chain ``B_0 ← B_1 ← … ← B_n = E`` (Eq. 21) is
the case where each stratum is coarsened by at most one other; a rooted tree
(Remark 6.5, e.g. domain and modality side by side above trajectories) lets
several strata coarsen the same finer one.  The tree is rooted at the total
space, so there is a single leaf space for the gated densities to return to.

Two forms describe the same object and are tested to agree:

* :class:`CompiledHierarchy` holds tensors (one projection index per stratum,
  token counts).  It is built from per-token id columns by the indexing of
  :mod:`fiberpo_theory.core.segments` (only the finest column per token, the
  coarser ones over its segments), and is what the FGH operator uses on the
  hot path.
* a NetworkX ``DiGraph`` (:func:`to_graph`, :func:`from_graph`): one node per
  element, labelled with its stratum, one edge from each element to its
  image.  It is the structural API for users, fuzzing and validation; it is
  far too slow for millions of tokens.

Densities on a stratum are tensors whose first dimension indexes its
elements (the FGH operator uses ``(M, 2)``, one column per sign channel).
Kernels are channel-diagonal (the ``1[l = l']`` factor of App. E.7), so a
kernel ``K_v: v → finer[v]`` is one weight per element of ``finer[v]``:
``K_v(c | π_v(c)) = weight[c]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
import collections.abc
from typing import Mapping, Sequence

import networkx as nx
import torch

from ..core import _validate
from ..core.distributed import global_max, global_segment_sums
from ..core.segments import Segments, nested_segments, parent_of, segments_for

__all__ = [
    "CompiledHierarchy",
    "from_ids",
    "from_tree",
    "to_graph",
    "from_graph",
    "sum_children",
    "compose",
    "pushforward",
    "reflect",
    "uniform_kernel",
    "weighted_kernel",
    "trajectory_length",
    "kernel_matrix",
    "projection_matrix",
    "reflecting_error",
    "check_reflecting",
    "shared_strata",
    "global_stratum_sums",
    "global_counts",
]

TOTAL = "token"


class _Projections(collections.abc.Sequence):
    """``CompiledHierarchy.projection``: the stored fibrations, a missing token-level one read off its Segments
    on access (so reading the strata above the trajectories never builds an N-sized index)."""

    def __init__(self, stored, segments):
        self._stored, self._segments = stored, segments

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, v):
        if isinstance(v, slice):
            return tuple(self[i] for i in range(len(self))[v])
        stored = self._stored[v]
        known = self._segments[v]
        return known.index if stored is None and known is not None else stored

    def __add__(self, other):  # concatenates as the tuple it stands for
        return tuple(self) + tuple(other)

    def __radd__(self, other):
        return tuple(other) + tuple(self)

    def __repr__(self) -> str:
        return repr(tuple(self))


@dataclass(frozen=True)
class CompiledHierarchy:
    """Tensor form of a fibration hierarchy.

    Strata are ordered so that ``finer[v] > v``: coarse strata first, the
    total space (tokens) last.  For a chain built from ``level_ids`` the
    order is that of Eq. 21, ``B_0, …, B_n``.

    Attributes:
        names: stratum names.
        sizes: number of elements of each stratum.
        finer: index of the stratum that ``v`` coarsens; ``-1`` for the total space.
        projection: ``projection[v]`` is a ``(sizes[finer[v]],)`` long tensor,
            the fibration ``π_v`` from ``finer[v]`` onto ``v`` (``None`` for the
            total space).  In the paper's chain notation ``projection[k] = π_{k+1}``.
            Built on first use from ``stored_projection``, whose entry is
            ``None`` for a stratum above the tokens whose ``segments`` are
            known: their per-token index is made only if something reads it
            (the fused engine does not).
        element_ids: the original id of every element, sorted; ``None`` for the
            tokens when their ids are their positions (read :attr:`ids`, which
            builds those on first use: the fused engine never needs N of them).
        token_count: ``(sizes[v],)`` long, the tokens below each element (T_τ, T_g, T_D).
        segments: for each stratum directly above the tokens, the
            :class:`~fiberpo_theory.core.segments.Segments` its token ids were
            indexed with (``None`` elsewhere; empty when unknown, e.g. after
            :meth:`to` or :func:`from_graph`).  The fused FiberPO engine reads
            its int32 index and contiguity from there instead of recomputing them.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    finer: tuple[int, ...]
    stored_projection: tuple[torch.Tensor | None, ...]
    element_ids: tuple[torch.Tensor | None, ...]
    token_count: tuple[torch.Tensor, ...]
    segments: tuple[Segments | None, ...] = ()

    @cached_property
    def projection(self) -> "Sequence[torch.Tensor | None]":
        """Every fibration as an index tensor; a token-level one of known ``segments`` is built when read."""
        return _Projections(self.stored_projection, self.segments or (None,) * len(self.names))

    @cached_property
    def ids(self) -> tuple[torch.Tensor, ...]:
        """The original id of every element, sorted (tokens: their positions)."""
        last = self.element_ids[-1]
        positions = torch.arange(self.sizes[self.total], device=self.device) if last is None else last
        return self.element_ids[:-1] + (positions,)

    @property
    def total(self) -> int:
        """Index of the total space (the token stratum)."""
        return len(self.names) - 1

    @property
    def device(self) -> torch.device:
        return self.token_count[-1].device

    @property
    def coarser(self) -> tuple[tuple[int, ...], ...]:
        """For each stratum, the strata that coarsen it directly."""
        out: list[list[int]] = [[] for _ in self.names]
        for v, f in enumerate(self.finer):
            if f >= 0:
                out[f].append(v)
        return tuple(tuple(c) for c in out)

    @property
    def is_chain(self) -> bool:
        return all(len(c) <= 1 for c in self.coarser)

    def index(self, name: str) -> int:
        """Stratum index of ``name`` (``ValueError`` if unknown)."""
        if name not in self.names:
            raise ValueError(f"stratum must be one of {list(self.names)}, got {name!r}")
        return self.names.index(name)

    def path(self, k: int, m: int) -> list[int]:
        """Strata from ``k`` down to ``m`` following ``finer`` (``k`` must coarsen ``m``)."""
        steps = [k]
        while steps[-1] != m:
            nxt = self.finer[steps[-1]]
            if nxt < 0:
                raise ValueError(f"stratum {self.names[k]!r} does not coarsen stratum {self.names[m]!r}")
            steps.append(nxt)
        return steps

    def token_index(self, v: int) -> torch.Tensor:
        """``(N,)`` element of stratum ``v`` above each token (π_{v←n}, Eq. 24)."""
        return compose(self, v, self.total)

    def to(self, device) -> "CompiledHierarchy":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CompiledHierarchy(
            self.names,
            self.sizes,
            self.finer,
            tuple(move(p) for p in self.projection),
            tuple(move(i) for i in self.element_ids),
            tuple(move(c) for c in self.token_count),
        )


# ---------------------------------------------------------------------------
# Building from id columns
# ---------------------------------------------------------------------------


def _id_column(
    name: str, ids: torch.Tensor, like: torch.Tensor | None, like_name: str, *, sign: bool = True
) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if like is not None and ids.dim() == 1 and ids.shape != like.shape:
        raise ValueError(f"{name} has length {ids.numel()} but {like_name} has length {like.numel()}")
    if like is not None and ids.device != like.device:
        raise ValueError(f"{name} is on {ids.device} but {like_name} is on {like.device}")
    ids = _validate.ids(name, ids, ids if like is None else like, sign=sign)
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: at least one token is needed")
    return ids


def _columns(level_ids, like: torch.Tensor | None, like_name: str) -> list[torch.Tensor]:
    if isinstance(level_ids, torch.Tensor) or not isinstance(level_ids, Sequence) or len(level_ids) == 0:
        raise ValueError("level_ids must be a non-empty list of id tensors (coarsest level first)")
    out = []
    last = len(level_ids) - 1
    for k, ids in enumerate(level_ids):
        ref = like if like is not None else (out[0] if out else None)
        if k == last and isinstance(ids, Segments):  # the finest level indexed already (once per batch)
            out.append(ids if ref is None else segments_for(f"level_ids[{k}]", ids, ref))
            continue
        # no min pass: the finest column's sign is read off its run values by Segments.from_ids, the others'
        # off the ids they carry to the finest segments (nested_segments)
        out.append(_id_column(f"level_ids[{k}]", ids, ref, like_name if like is not None else "level_ids[0]",
                              sign=False))
    return out


def _nested_segments(cols: list[torch.Tensor], names: list[str]) -> tuple[list[Segments], list[torch.Tensor | None]]:
    """Dense indexing of every level and the projection of each level onto the one above (see
    :func:`~fiberpo_theory.core.segments.nested_segments`, shared with FiberPO-Domain's closed form)."""
    labels = [f"{name} (level_ids[{k}])" for k, name in enumerate(names[: len(cols)])]
    finest = cols[-1] if isinstance(cols[-1], Segments) else Segments.from_ids(cols[-1], name=f"level_ids[{len(cols) - 1}]")
    return nested_segments(cols[:-1], finest, labels, id_names=[f"level_ids[{k}]" for k in range(len(cols) - 1)])


def from_ids(
    level_ids: Sequence[torch.Tensor], names: Sequence[str] | None = None, *, like=None, like_name: str = "log_ratio"
) -> CompiledHierarchy:
    """A chain hierarchy (Eq. 21) from per-token id columns, coarsest first.

    ``level_ids[-1]`` is the finest id level (the trajectory for FiberPO);
    the tokens form the total space below it.  Ids are arbitrary
    non-negative integers.  Raises ``ValueError`` when a level does not nest
    in the level above it (an element with tokens under two parents).

    ``like`` (optional) is the per-token tensor the ids label; it fixes the
    expected length and device, and error messages then refer to it.
    ``level_ids[-1]`` may also be a ready ``Segments`` of the finest ids
    (``Segments.from_ids`` or ``from_lengths``), so that a batch indexes its
    trajectories once for the gate and μ alike.
    """
    cols = _columns(level_ids, like, like_name)
    names = _chain_names(len(cols), names)
    segs, projection = _nested_segments(cols, names)
    projection.append(None)  # tokens → trajectories: read off segs[-1] when asked for (CompiledHierarchy.projection)
    projection.append(None)
    n = len(cols)
    h = CompiledHierarchy(
        names=tuple(names),
        sizes=tuple(s.size for s in segs) + (segs[-1].elements,),
        finer=tuple(range(1, n + 1)) + (-1,),
        stored_projection=tuple(projection),
        element_ids=tuple(s.ids for s in segs) + (None,),
        token_count=(),
        segments=(None,) * (n - 1) + (segs[-1], None),
    )
    return _with_token_counts(h, segs[-1].device)


def _chain_names(n: int, names) -> list[str]:
    if names is None:
        return [f"level{k}" for k in range(n - 1)] + ["trajectory", TOTAL]
    names = list(names)
    if len(names) == n:
        names = names + [TOTAL]
    if len(names) != n + 1 or len(set(names)) != len(names) or not all(isinstance(s, str) for s in names):
        raise ValueError(f"names must be {n} (or {n + 1} with the token stratum) distinct strings, got {names!r}")
    return names


def _tree_order(finer: Mapping[str, str], total: str) -> list[str]:
    """Strata sorted so that every stratum precedes the one it coarsens."""
    depth: dict[str, int] = {total: 0}

    def depth_of(name: str, seen: tuple[str, ...]) -> int:
        if name in depth:
            return depth[name]
        if name in seen:
            raise ValueError(f"finer has a cycle: {' -> '.join(seen + (name,))}")
        if name not in finer:
            raise ValueError(f"finer: stratum {seen[-1]!r} coarsens unknown stratum {name!r}")
        depth[name] = depth_of(finer[name], seen + (name,)) + 1
        return depth[name]

    for name in finer:
        depth_of(name, ())
    order = sorted(finer, key=lambda s: -depth[s])
    return order + [total]


def from_tree(
    columns: Mapping[str, torch.Tensor],
    finer: Mapping[str, str],
    *,
    total: str = TOTAL,
    like=None,
    like_name: str = "log_ratio",
) -> CompiledHierarchy:
    """A tree-shaped hierarchy (Remark 6.5) from per-token id columns.

    ``columns[name]`` labels every token with its element of stratum
    ``name``; ``finer[name]`` names the stratum that ``name`` coarsens (the
    total space is ``total``).  Example, domain and modality side by side
    above trajectories::

        from_tree({"trajectory": t, "domain": d, "modality": m},
                  {"trajectory": "token", "domain": "trajectory", "modality": "trajectory"})

    Raises ``ValueError`` for a cycle, an unknown stratum, or ids that do not
    nest along an edge.
    """
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError("columns must be a non-empty mapping from stratum name to id tensor")
    if not isinstance(finer, Mapping) or set(finer) != set(columns):
        raise ValueError(f"finer must name the finer stratum of every column {sorted(columns)}, got {dict(finer)!r}")
    if total in columns:
        raise ValueError(f"columns must not contain the total space {total!r}")
    order = _tree_order(finer, total)
    first = like
    cols = {}
    for name in order[:-1]:
        ref_name = like_name if like is not None else f"columns[{order[0]!r}]"
        cols[name] = _id_column(f"columns[{name!r}]", columns[name], first, ref_name, sign=False)
        first = cols[name] if first is None else first
    segs = {name: Segments.from_ids(cols[name], name=f"columns[{name!r}]") for name in order[:-1]}
    position = {name: i for i, name in enumerate(order)}
    projection: list[torch.Tensor | None] = []
    for name in order[:-1]:
        f = finer[name]
        if f == total:
            projection.append(segs[name].index)
        else:
            projection.append(parent_of(segs[f], segs[name].index, child_name=f, parent_name=name))
    projection.append(None)
    n_tok = first.numel()
    h = CompiledHierarchy(
        names=tuple(order),
        sizes=tuple(segs[s].size for s in order[:-1]) + (n_tok,),
        finer=tuple(position[finer[s]] for s in order[:-1]) + (-1,),
        stored_projection=tuple(projection),
        element_ids=tuple(segs[s].ids for s in order[:-1]) + (None,),
        token_count=(),
        segments=tuple(segs[s] if finer[s] == total else None for s in order[:-1]) + (None,),
    )
    return _with_token_counts(h, first.device)


# ---------------------------------------------------------------------------
# NetworkX form
# ---------------------------------------------------------------------------


def to_graph(h: CompiledHierarchy) -> nx.DiGraph:
    """The hierarchy as a DiGraph: node ``(stratum, element id)``, edge element → image.

    Nodes carry ``stratum`` (name) and ``element`` (original id; a token's
    is its position).  ``graph.graph["strata"]`` lists the stratum names in
    compiled order.  Meant for small hierarchies.
    """
    g = nx.DiGraph(strata=list(h.names))
    for v, name in enumerate(h.names):
        g.add_nodes_from(((name, e), {"stratum": name, "element": e}) for e in h.ids[v].tolist())
    for v, f in enumerate(h.finer):
        if f < 0:
            continue
        child = h.ids[f].tolist()
        image = h.ids[v][h.projection[v]].tolist()
        g.add_edges_from(((h.names[f], c), (h.names[v], p)) for c, p in zip(child, image))
    return g


def _node_labels(graph: nx.DiGraph) -> dict:
    labels = {}
    for node, data in graph.nodes(data=True):
        stratum, element = data.get("stratum"), data.get("element")
        if not isinstance(stratum, str) or isinstance(element, bool) or not isinstance(element, int) or element < 0:
            raise ValueError(f"graph node {node!r} needs a 'stratum' name and a non-negative int 'element' attribute")
        labels[node] = (stratum, element)
    return labels


def _stratum_tree(graph: nx.DiGraph, labels: dict) -> tuple[dict[str, str], str]:
    """Which stratum each stratum coarsens, read off the edges; and the total space."""
    strata = {s for s, _ in labels.values()}
    finer: dict[str, str] = {}
    for u, v in graph.edges():
        su, sv = labels[u][0], labels[v][0]
        if su == sv:
            raise ValueError(f"graph edge {u!r} -> {v!r} stays inside stratum {su!r}")
        if finer.setdefault(sv, su) != su:
            raise ValueError(f"stratum {sv!r} is the image of two strata ({finer[sv]!r} and {su!r}); a tree needs one")
    roots = sorted(strata - set(finer))
    if len(roots) != 1:
        raise ValueError(f"graph must have exactly one finest stratum (the total space), found {roots}")
    return finer, roots[0]


def from_graph(graph: nx.DiGraph) -> CompiledHierarchy:
    """Validate a hierarchy DiGraph and compile it to tensors.

    Raises ``ValueError`` for a cycle, an element mapped to two parents in
    one stratum (or to none), an empty fibre, or strata that do not form a
    tree rooted at the total space.  Elements of each stratum are ordered by
    id; token elements must be the positions ``0..N-1``.
    """
    if not isinstance(graph, nx.DiGraph):
        raise ValueError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    if graph.number_of_nodes() == 0:
        raise ValueError("graph is empty")
    if not nx.is_directed_acyclic_graph(graph):
        raise ValueError(f"graph has a cycle: {nx.find_cycle(graph)}")
    labels = _node_labels(graph)
    finer, total = _stratum_tree(graph, labels)
    order = _tree_order(finer, total)
    members = {s: sorted(e for t, e in labels.values() if t == s) for s in order}
    if members[total] != list(range(len(members[total]))):
        raise ValueError(f"the elements of the total space {total!r} must be the token positions 0..N-1")
    dense = {s: {e: i for i, e in enumerate(members[s])} for s in order}
    projection = [_graph_projection(graph, labels, s, finer[s], dense) for s in order[:-1]] + [None]
    position = {s: i for i, s in enumerate(order)}
    h = CompiledHierarchy(
        names=tuple(order),
        sizes=tuple(len(members[s]) for s in order),
        finer=tuple(position[finer[s]] for s in order[:-1]) + (-1,),
        stored_projection=tuple(projection),
        element_ids=tuple(torch.tensor(members[s], dtype=torch.long) for s in order),
        token_count=(),
    )
    return _with_token_counts(h, torch.device("cpu"))


def _graph_projection(graph, labels, coarse: str, fine: str, dense) -> torch.Tensor:
    image = torch.full((len(dense[fine]),), -1, dtype=torch.long)
    for u, v in graph.edges():
        if labels[v][0] != coarse:
            continue
        child = dense[fine][labels[u][1]]
        if image[child] >= 0:
            raise ValueError(f"element {u!r} is mapped to two parents in stratum {coarse!r}")
        image[child] = dense[coarse][labels[v][1]]
    if bool((image < 0).any()):
        bad = int((image < 0).nonzero()[0, 0])
        raise ValueError(f"element {(fine, int(list(dense[fine])[bad]))!r} has no image in stratum {coarse!r}")
    fibre = torch.bincount(image, minlength=len(dense[coarse]))
    if bool((fibre == 0).any()):
        bad = int((fibre == 0).nonzero()[0, 0])
        raise ValueError(f"element {(coarse, int(list(dense[coarse])[bad]))!r} has an empty fibre (nothing maps onto it)")
    return image


def _with_token_counts(h: CompiledHierarchy, device) -> CompiledHierarchy:
    """Fill ``token_count`` by pushing one per token up every fibration (through :func:`sum_children`).

    A stratum directly above the tokens whose Segments are known already
    has its counts there, so no N-sized push is made for it.
    """
    known = h.segments or (None,) * len(h.names)
    counts: list[torch.Tensor | None] = [None] * len(h.names)
    # one per token as a broadcast view: read-only, and no N-sized buffer to fill
    counts[h.total] = torch.ones(1, dtype=torch.long, device=device).expand(h.sizes[h.total])
    for v in reversed(range(h.total)):
        f = h.finer[v]
        counts[v] = known[v].count if f == h.total and known[v] is not None else sum_children(
            counts[f], h.projection[v], h.sizes[v]
        )
    return CompiledHierarchy(h.names, h.sizes, h.finer, h.stored_projection, h.element_ids, tuple(counts), h.segments)


# ---------------------------------------------------------------------------
# Maps on densities
# ---------------------------------------------------------------------------


def sum_children(values: torch.Tensor, projection: torch.Tensor, size: int) -> torch.Tensor:
    """Sum the rows of ``values`` over each fibre of ``projection`` (one pushforward step).

    Every reduction from a stratum to a coarser one goes through here.  It
    is local: on data-parallel shards the sums of the strata that span ranks
    are completed by :func:`global_stratum_sums`, once per stratum and from
    local sums (reducing after every step would count an element held by r
    ranks r times in the next coarser sum).
    """
    out = values.new_zeros((size,) + tuple(values.shape[1:]))
    return out.index_add(0, projection, values)


def compose(h: CompiledHierarchy, k: int, m: int) -> torch.Tensor:
    """π_{k←m} (Eq. 24) as an index tensor: the element of stratum ``k`` above each element of ``m``."""
    steps = h.path(k, m)
    if len(steps) == 1:
        return torch.arange(h.sizes[m], device=h.device)
    index = h.projection[steps[-2]]
    for v in reversed(steps[:-2]):
        index = h.projection[v].index_select(0, index)
    return index


def pushforward(h: CompiledHierarchy, density: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """π_{k←m *} σ (Eq. 25): the density of stratum ``m`` summed onto stratum ``k``."""
    if density.shape[:1] != (h.sizes[m],):
        raise ValueError(f"density must have {h.sizes[m]} rows (stratum {h.names[m]!r}), got shape {tuple(density.shape)}")
    if k == m:
        return density
    return sum_children(density, compose(h, k, m), h.sizes[k])


def reflect(h: CompiledHierarchy, v: int, kernel: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """K_v(p): spread a density on stratum ``v`` over its fibres in ``finer[v]`` with kernel weights."""
    spread = density.index_select(0, h.projection[v])
    weight = kernel.to(density.dtype)
    return spread * weight.view(-1, *([1] * (density.dim() - 1)))


# ---------------------------------------------------------------------------
# Reflecting kernels (Def. 4.3 item 3, Def. 6.2 condition (i), App. E.5.4, E.7)
# ---------------------------------------------------------------------------


def weighted_kernel(h: CompiledHierarchy, v: int, weight: torch.Tensor) -> torch.Tensor:
    """K_v(c | π_v(c)) = w_c / Σ_{c' in the fibre} w_{c'}: reflecting for any positive weights."""
    finer_size = h.sizes[h.finer[v]]
    if not isinstance(weight, torch.Tensor) or weight.shape != (finer_size,):
        raise ValueError(f"weight must be a ({finer_size},) tensor over stratum {h.names[h.finer[v]]!r}")
    if not bool((weight > 0).all()):
        raise ValueError("weight must be strictly positive")
    total = sum_children(weight, h.projection[v], h.sizes[v])
    return weight / total.index_select(0, h.projection[v])


def uniform_kernel(h: CompiledHierarchy, v: int, dtype=torch.float64) -> torch.Tensor:
    """K_v(c | p) = 1 / |fibre of p| (K of App. E.5.4, K1 and K2 of App. E.7)."""
    fibre = sum_children(torch.ones(h.projection[v].numel(), dtype=dtype, device=h.device), h.projection[v], h.sizes[v])
    return 1.0 / fibre.index_select(0, h.projection[v])


def trajectory_length(h: CompiledHierarchy, trajectory: int, dtype=torch.float64) -> torch.Tensor:
    """T_τ of every token: the token count of the trajectory above it."""
    return h.token_count[trajectory].to(dtype).index_select(0, compose(h, trajectory, h.total))


def _coarsening_closure(h: CompiledHierarchy, v: int) -> list[int]:
    """Strata strictly coarser than ``v`` (those whose finer-chain passes through ``v``)."""
    out = []
    for u in range(len(h.names)):
        w = h.finer[u]
        while w >= 0 and w != v:
            w = h.finer[w]
        if w == v and u != v:
            out.append(u)
    return out


def kernel_matrix(h: CompiledHierarchy, v: int, kernel: torch.Tensor) -> torch.Tensor:
    """Dense column-stochastic matrix of K_v, shape ``(sizes[finer[v]], sizes[v])`` (small checks)."""
    f = h.finer[v]
    out = torch.zeros(h.sizes[f], h.sizes[v], dtype=kernel.dtype, device=kernel.device)
    out[torch.arange(h.sizes[f], device=kernel.device), h.projection[v]] = kernel
    return out


def projection_matrix(h: CompiledHierarchy, v: int, dtype=torch.float64) -> torch.Tensor:
    """Dense 0/1 matrix of the pushforward π_v*, shape ``(sizes[v], sizes[finer[v]])``."""
    f = h.finer[v]
    out = torch.zeros(h.sizes[v], h.sizes[f], dtype=dtype, device=h.device)
    out[h.projection[v], torch.arange(h.sizes[f], device=h.device)] = 1
    return out


def reflecting_error(
    h: CompiledHierarchy, v: int, kernel: torch.Tensor, *, process_group=None, shared: Sequence[int] = ()
) -> float:
    """max |π_v* K_v − id| over the elements of ``v``, and ∞ for a negative weight.

    For a channel-diagonal kernel supported on fibres this is the largest
    deviation of a fibre's total weight from 1, i.e. of ``π_* ∘ K`` from
    ``id_B`` (Def. 4.3 item 3).

    With a ``process_group`` (data-parallel shards, see :func:`shared_strata`)
    a fibre of a ``shared`` stratum is summed over all ranks, and the error
    is the maximum over all ranks, so every rank returns the same value.
    """
    weight = kernel.to(torch.float64)
    if process_group is not None and h.finer[v] in shared:
        # an element of a shared finer stratum sits on several ranks: count its weight once in total
        ones = torch.ones(weight.numel(), dtype=torch.long, device=weight.device)
        (holders,) = global_stratum_sums(h, h.finer[v], ones, process_group=process_group)
        weight = weight / holders
    column = sum_children(weight, h.projection[v], h.sizes[v])
    if v in shared:
        (column,) = global_stratum_sums(h, v, column, process_group=process_group)
    error = torch.where((kernel < 0).any(), float("inf"), (column - 1).abs().max())
    return float(global_max(error, process_group))


def check_reflecting(
    h: CompiledHierarchy,
    kernels: Sequence[torch.Tensor | None],
    *,
    atol: float = 1e-9,
    process_group=None,
    shared: Sequence[int] = (),
) -> None:
    """Raise ``ValueError`` naming the first stratum whose kernel is not a reflecting Markov kernel.

    ``process_group`` and ``shared``: see :func:`reflecting_error` (every rank raises alike).
    """
    if len(kernels) != len(h.names):
        raise ValueError(f"kernels must have one entry per stratum ({len(h.names)}), got {len(kernels)}")
    for v, f in enumerate(h.finer):
        kernel = kernels[v]
        if f < 0:
            continue
        if not isinstance(kernel, torch.Tensor) or kernel.shape != (h.sizes[f],):
            raise ValueError(f"kernels[{v}] ({h.names[v]!r}) must be a ({h.sizes[f]},) tensor over {h.names[f]!r}")
        err = reflecting_error(h, v, kernel, process_group=process_group, shared=shared)
        if not err <= atol:
            raise ValueError(f"kernels[{v}] ({h.names[v]!r}) is not reflecting: max |π_* K - id| = {err:.3g}")


# ---------------------------------------------------------------------------
# Data-parallel shards (torch.distributed; assumptions in fiberpo_theory.core.distributed)
# ---------------------------------------------------------------------------


def shared_strata(h: CompiledHierarchy, trajectory: int, process_group=None) -> tuple[int, ...]:
    """Strata whose elements may have tokens on several ranks: those strictly coarser than ``trajectory``.

    On data-parallel shards each rank compiles the hierarchy of its own
    tokens.  A trajectory lies on one rank, and so does everything between
    it and the tokens (turns), so those strata stay local.  The strata above
    it (groups, domains, ...) carry global ids and may span ranks; their
    sums must be completed over the ranks (:func:`global_stratum_sums`).
    Empty when ``process_group`` is ``None``.

    A tree branch that coarsens the tokens without passing through the
    trajectories could span ranks with ids of unknown scope; it is refused.
    """
    if process_group is None:
        return ()
    on_rank = set(h.path(trajectory, h.total))
    above = _coarsening_closure(h, trajectory)
    side = [v for v in range(h.total) if v not in on_rank and v not in above]
    if side:
        raise ValueError(
            f"stratum {h.names[side[0]]!r} does not coarsen the trajectory stratum {h.names[trajectory]!r}; "
            "with a process_group every stratum must lie above the trajectories or between them and the tokens"
        )
    return tuple(sorted(above))


def global_stratum_sums(h: CompiledHierarchy, v: int, *values, process_group=None, check_nesting: bool = False):
    """Sum per-element values of stratum ``v`` over the ranks, keyed by the stratum's original ids.

    ``values`` (rows = elements of ``v``) must be sums over this rank's
    tokens only.  With ``check_nesting`` it is also checked that every
    element has the same image in each stratum coarsening ``v`` on every
    rank (a ``ValueError`` on all ranks otherwise).  ``process_group=None``:
    ``values`` unchanged.  See :func:`fiberpo_theory.core.distributed.global_segment_sums`.
    """
    ids, name = h.ids[v], h.names[v]
    coarser = h.coarser[v] if check_nesting else ()
    parents = [(h.names[c], h.ids[c].index_select(0, h.projection[c])) for c in coarser]
    for parent_name, parent_ids in parents[1:]:  # a tree: one check per further coarsening stratum
        global_segment_sums(ids, process_group=process_group, parent_ids=parent_ids, name=name, parent_name=parent_name)
    parent_name, parent_ids = parents[0] if parents else ("parent", None)
    return global_segment_sums(
        ids, *values, process_group=process_group, parent_ids=parent_ids, name=name, parent_name=parent_name
    )


def global_counts(h: CompiledHierarchy, trajectory: int, process_group=None):
    """Trajectory counts |Tj(e)| and token counts T_e of every stratum, over the whole batch.

    Returns ``(trajectory_count, token_count)``, one entry per stratum;
    ``trajectory_count[v]`` is ``None`` unless ``v`` coarsens the trajectory
    stratum.  The counts of :func:`shared_strata` are summed over the ranks
    of ``process_group`` (one reduction per stratum, nesting checked); the
    other strata are local and keep their local counts.
    """
    above = set(_coarsening_closure(h, trajectory))
    ones = torch.ones(h.sizes[trajectory], dtype=torch.long, device=h.device)
    trajectories = [pushforward(h, ones, v, trajectory) if v in above else None for v in range(len(h.names))]
    tokens = list(h.token_count)
    for v in shared_strata(h, trajectory, process_group):
        trajectories[v], tokens[v] = global_stratum_sums(
            h, v, trajectories[v], tokens[v], process_group=process_group, check_nesting=True
        )
    return tuple(trajectories), tuple(tokens)
