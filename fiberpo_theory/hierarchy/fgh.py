"""The Fibration Gating Hierarchy operator (paper Sec. 6.1, Eq. 26-29) and FiberPO on any hierarchy.

A density on a stratum is an ``(M, 2)`` tensor, one column per sign channel
(``+1`` first).  An FGH instance is a :class:`~fiberpo_theory.hierarchy.CompiledHierarchy`
together with one reflecting kernel and one atomic gate per stratum.  The
operator pushes a token density forward to every stratum, subtracts from each
stratum what its coarser neighbours already account for, gates that residual
elementwise, and carries every gated piece back to the tokens through the
kernels.  Each step is one segment reduction or one gather per stratum; the
only Python loop runs over strata.

The FiberPO family (App. E.5.4 for one level, App. E.7 for three) is the
instance whose kernels weight every element by its trajectory mass and whose
gates are ``m·g_agg(ρ/m, C, T)`` above the tokens and ``m·clip(ρ/m, ε)`` on
them.  :func:`fgh_operator` is the specification; :func:`fused_gated_ratio`
evaluates the same instance with the fused token gate of :mod:`fiberpo_theory.core.fused`
around the operator on the strata above the tokens (M trajectories instead of
N tokens), which is what :func:`fiberpo_hierarchy_gated_ratio` runs.

Data-parallel shards (``process_group``): each rank compiles the hierarchy
of its own tokens.  The strata above the trajectories
(:func:`~fiberpo_theory.hierarchy.shared_strata`) are sums over the whole
batch, so their pushforwards, trajectory counts and token counts are local
sums completed over the ranks, once per stratum, before anything divides by
them; everything else (reflections, gates, the way back to the tokens) is
per element and needs no communication.  The result equals the
single-process one on the concatenated batch.  Assumptions: those of
:mod:`fiberpo_theory.core.distributed` (trajectories on one rank, global ids
above them, the same collectives on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from ..core import _validate
from . import structure as hier
from ..core.distributed import global_segment_sums
from ..core.gates import g_agg, g_agg_regime, g_agg_thresholds, sign_split, symmetric_clip
from .structure import CompiledHierarchy, reflect, sum_children
from ..core.fused import fiber_gated_ratio
from ..core.objectives import rgf_objective
from ..core.segments import Segments

__all__ = [
    "GateContext",
    "FGHParts",
    "FGH",
    "fgh_operator",
    "fbg_operator",
    "decompose",
    "recover",
    "AggregateGate",
    "FiberGate",
    "trajectory_mass",
    "mass_kernels",
    "FiberPOHierarchy",
    "fiberpo_fgh",
    "fiberpo_hierarchy_gated_ratio",
    "fiberpo_tree_gated_ratio",
    "fused_gated_ratio",
    "fgh_surrogate",
]


# ---------------------------------------------------------------------------
# The general operator (Eq. 26-28) and the FBG operator (Eq. 4)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GateContext:
    """What an atomic gate of stratum ``stratum`` may look at besides its argument.

    ``pushforwards[u]`` is π_{u←n *}σ for every stratum ``u`` coarser than
    ``stratum`` (the ``p_<k`` of Def. 6.2, Object 3) and ``None`` elsewhere.
    """

    stratum: int
    hierarchy: CompiledHierarchy
    pushforwards: tuple[torch.Tensor | None, ...]


Gate = Callable[[torch.Tensor, GateContext], torch.Tensor]


class FGHParts(NamedTuple):
    """Intermediate densities of one FGH evaluation, indexed by stratum."""

    pushforwards: tuple[torch.Tensor, ...]  # σ_v = π_{v←n *} σ (Eq. 22, 25)
    residuals: tuple[torch.Tensor, ...]  # argument of g_v in Eq. 28
    gated: tuple[torch.Tensor, ...]  # G_v(σ_v) (Eq. 28)
    output: torch.Tensor  # G(σ) (Eq. 27), a density on the total space


def _strictly_coarser(h: CompiledHierarchy) -> list[set[int]]:
    """For each stratum, every stratum above it (whose finer-chain passes through it)."""
    out: list[set[int]] = [set() for _ in h.names]
    for u in range(len(h.names)):
        w = h.finer[u]
        while w >= 0:
            out[w].add(u)
            w = h.finer[w]
    return out


def _pushforwards(h: CompiledHierarchy, sigma: torch.Tensor, process_group=None, shared=()) -> list[torch.Tensor]:
    """π_{v←n *} σ for every stratum (Eq. 22, 25), one segment sum per fibration.

    The strata in ``shared`` are then summed over the ranks, each from its
    local pushforward: a sum of already-global children would count a child
    held by r ranks r times.
    """
    local: list[torch.Tensor | None] = [None] * len(h.names)
    local[h.total] = sigma
    for v in reversed(range(h.total)):
        local[v] = sum_children(local[h.finer[v]], h.projection[v], h.sizes[v])
    push = list(local)
    for v in shared:
        (push[v],) = hier.global_stratum_sums(h, v, local[v], process_group=process_group)
    return push


def _gate_strata(h: CompiledHierarchy, push, kernels, gates):
    """Residuals σ_v − Σ_c K_c σ_c over the strata c coarsening v, and their gated values (Eq. 28)."""
    above = _strictly_coarser(h)
    residuals, gated = [], []
    for v, coarser in enumerate(h.coarser):
        residual = push[v]
        for c in coarser:
            residual = residual - reflect(h, c, kernels[c], push[c])
        # a gate may read p_<k, the densities of the strata above it (Def. 6.2, Object 3)
        context = GateContext(v, h, tuple(p if u in above[v] else None for u, p in enumerate(push)))
        residuals.append(residual)
        gated.append(gates[v](residual, context))
    return residuals, gated


def _reflect_to_tokens(h: CompiledHierarchy, gated, kernels) -> torch.Tensor:
    """Σ_k K_{n←k} g_k, carried down one kernel per stratum (Horner's scheme for the products of Eq. 23)."""
    incoming: list[torch.Tensor | None] = [None] * len(h.names)
    for v in range(h.total):
        total_v = gated[v] if incoming[v] is None else gated[v] + incoming[v]
        carried = reflect(h, v, kernels[v], total_v)
        f = h.finer[v]
        incoming[f] = carried if incoming[f] is None else incoming[f] + carried
    last = gated[h.total]
    return last if incoming[h.total] is None else last + incoming[h.total]


def fgh_operator(
    sigma: torch.Tensor, h: CompiledHierarchy, kernels, gates, *, process_group=None, shared=()
) -> FGHParts:
    """The FGH gating function G(σ) = Σ_k K_{n←k} G_k(π_{k←n *} σ) (Eq. 27, 28; Eq. 26 expanded).

    ``G_k`` gates ``σ_k − K_{k−1}(π_k* σ_k)`` (Eq. 28); on a tree (Remark 6.5)
    a stratum subtracts the reflection of every stratum that coarsens it, so
    the gated pieces still add up to σ when every gate is the identity.

    Args:
        sigma: ``(N, C)`` density on the total space (``C = 2`` sign channels in FiberPO).
        h: the hierarchy.
        kernels: one reflecting kernel per stratum (weights over ``finer[v]``; ``None`` for the total space).
        gates: one callable ``gate(residual, GateContext) -> tensor`` per stratum, acting elementwise.
        process_group: ``None`` (one process, no ``torch.distributed`` call) or the group over
            which the data-parallel shards are summed.
        shared: strata whose elements may span ranks (:func:`~fiberpo_theory.hierarchy.shared_strata`);
            their pushforwards are summed over ``process_group``, so the kernels and gates of
            these strata must hold whole-batch values too (as :func:`fiberpo_fgh` builds them).
    """
    n_strata = len(h.names)
    if not isinstance(sigma, torch.Tensor) or sigma.dim() < 1 or sigma.shape[0] != h.sizes[h.total]:
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"sigma must be a tensor with {h.sizes[h.total]} rows (one per token), got {shape}")
    if len(kernels) != n_strata or len(gates) != n_strata:
        raise ValueError(f"kernels and gates need one entry per stratum ({n_strata}), got {len(kernels)} and {len(gates)}")
    push = _pushforwards(h, sigma, process_group, tuple(shared))
    residuals, gated = _gate_strata(h, push, kernels, gates)
    return FGHParts(tuple(push), tuple(residuals), tuple(gated), _reflect_to_tokens(h, gated, kernels))


def fbg_operator(sigma, projection, size: int, kernel, base_gate, fiber_gate) -> torch.Tensor:
    """Fiber Bundle Gating, Eq. 4, evaluated as written (the reference for Remark 6.3).

    ``G(σ) = K g_Base(π_* σ) + g_Fiber,π_*σ(σ − K π_* σ)`` with
    ``base_gate(p)`` acting on the base density and ``fiber_gate(residual, p)``
    on the total space (it may read the base density ``p``).
    """
    base = sum_children(sigma, projection, size)
    weight = kernel.to(sigma.dtype).view(-1, *([1] * (sigma.dim() - 1)))
    reflected_gate = weight * base_gate(base).index_select(0, projection)
    residual = sigma - weight * base.index_select(0, projection)
    return reflected_gate + fiber_gate(residual, base)


@dataclass(frozen=True)
class FGH:
    """An FGH instance (Def. 6.2): hierarchy, one kernel and one gate per stratum.

    With ``validate`` (the default) every kernel is checked to be a
    reflecting Markov kernel (condition (i) of Def. 6.2); on data-parallel
    shards (``process_group``, ``shared``: see :func:`fgh_operator`) the
    fibres of shared strata are summed over the ranks for that check.
    """

    hierarchy: CompiledHierarchy
    kernels: tuple[torch.Tensor | None, ...]
    gates: tuple[Gate, ...]
    validate: bool = True
    process_group: object = None
    shared: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.gates) != len(self.hierarchy.names) or not all(callable(g) for g in self.gates):
            raise ValueError(f"gates must be {len(self.hierarchy.names)} callables, one per stratum")
        if self.validate:
            hier.check_reflecting(self.hierarchy, self.kernels, process_group=self.process_group, shared=self.shared)

    def parts(self, sigma: torch.Tensor) -> FGHParts:
        return fgh_operator(
            sigma, self.hierarchy, self.kernels, self.gates, process_group=self.process_group, shared=self.shared
        )

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.parts(sigma).output


# ---------------------------------------------------------------------------
# Decomposition and recovery maps (App. E.5.4, E.7 item 4)
# ---------------------------------------------------------------------------


def decompose(log_ratio: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """F(r)_{i,l} = 1[l_i = l] l_i log r_i / T_τ (App. E.7 item 4), as an ``(N, 2)`` density.

    The split is :func:`~fiberpo_theory.core.gates.sign_split`, the one the
    closed-form FiberPO uses: a token at exactly ``r = 1`` carries derivative
    ``1/T_τ`` in its positive channel, which is what makes ``R ∘ G ∘ F`` have
    identity Jacobian there.  ``length`` is ``T_τ`` per token.
    """
    return sign_split(log_ratio) / length.to(log_ratio.dtype).unsqueeze(1)


def recover(sigma: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """R(σ)_i = exp(T_τ (σ_{i,+1} − σ_{i,−1})) (App. E.5.4, E.7 item 4); a left inverse of :func:`decompose`."""
    return torch.exp(length.to(sigma.dtype) * (sigma[:, 0] - sigma[:, 1]))


# ---------------------------------------------------------------------------
# FiberPO atomic gates (App. E.5.4, E.7 item 3)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregateGate:
    """``m_e · g_agg(ρ_e / m_e, C^(l), T_e)`` per element ``e`` and channel ``l`` (App. E.7 item 3, Eq. 10).

    ``m_e`` is the element's trajectory mass (|Tj(D)|, |Tj(g)|, 1 for a
    trajectory), ``T_e`` its token count.  With ``m_e = 1`` this is the base
    gate ``g_Base,(τ,l) = g_agg(σ, C^(l), T_τ)`` of App. E.5.4.
    """

    mass: torch.Tensor  # (M,)
    tokens: torch.Tensor  # (M,)
    budget: torch.Tensor  # (2,): C⁺, C⁻

    def normalised(self, residual: torch.Tensor) -> torch.Tensor:
        """ρ_e / m_e: the signed aggregate deviation that g_agg sees."""
        return residual / self.mass.unsqueeze(1)

    def regime(self, residual: torch.Tensor) -> torch.Tensor:
        return g_agg_regime(self.normalised(residual), self.budget, self.tokens.unsqueeze(1))

    def __call__(self, residual: torch.Tensor, context: GateContext | None = None) -> torch.Tensor:
        return self.mass.unsqueeze(1) * g_agg(self.normalised(residual), self.budget, self.tokens.unsqueeze(1))


@dataclass(frozen=True)
class FiberGate:
    """``m_i · clip(ρ_i / m_i, ±ε)`` with ``m_i = 1/T_τ``: the token gate (1/T_τ) clip(T_τ σ, ε) of App. E.7.

    Equal to ``g_Fiber = clip(σ, ±ε/T_τ)`` of App. E.5.4.
    """

    mass: torch.Tensor  # (N,)
    eps: float

    def normalised(self, residual: torch.Tensor) -> torch.Tensor:
        return residual / self.mass.unsqueeze(1)

    def regime(self, residual: torch.Tensor) -> torch.Tensor:
        """0 where the clip passes, 2 where it is active (codes of :mod:`~fiberpo_theory.core.gates`)."""
        clipped = self.normalised(residual).abs() > self.eps
        return torch.where(clipped, 2, 0)

    def __call__(self, residual: torch.Tensor, context: GateContext | None = None) -> torch.Tensor:
        return self.mass.unsqueeze(1) * symmetric_clip(self.normalised(residual), self.eps)


# ---------------------------------------------------------------------------
# FiberPO on a hierarchy
# ---------------------------------------------------------------------------


def trajectory_mass(
    h: CompiledHierarchy, trajectory: int, dtype=torch.float64, length=None, trajectory_count=None
) -> tuple[torch.Tensor, ...]:
    """Mass of every element when each trajectory weighs 1 and its tokens 1/T_τ each.

    Strata that coarsen the trajectory stratum get the integer trajectory
    count |Tj(e)| (exact); the trajectory stratum gets 1; every other
    stratum (turns between trajectory and token, or a branch directly above
    the tokens) gets the sum of its tokens' 1/T_τ.  These are the masses
    behind the kernels and gates of App. E.7.  ``length`` (T_τ per token) may
    be passed when already computed; so may ``trajectory_count`` (|Tj(e)|
    per stratum coarser than the trajectories, e.g. the global counts of
    :func:`~fiberpo_theory.hierarchy.structure.global_counts` on data-parallel shards).
    """
    length = hier.trajectory_length(h, trajectory, dtype) if length is None else length
    if trajectory_count is None:
        trajectory_count = hier.global_counts(h, trajectory)[0]
    token_mass = 1.0 / length
    mass: list[torch.Tensor | None] = [None] * len(h.names)
    mass[h.total] = token_mass
    above = set(hier._coarsening_closure(h, trajectory))
    for v in reversed(range(h.total)):
        if v == trajectory:
            mass[v] = torch.ones(h.sizes[v], dtype=dtype, device=h.device)
        elif v in above:
            mass[v] = trajectory_count[v].to(dtype)
        else:
            mass[v] = sum_children(mass[h.finer[v]], h.projection[v], h.sizes[v])
    return tuple(mass)


def mass_kernels(h: CompiledHierarchy, mass: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """K_v(c | p) = mass(c) / mass(p) for every stratum (App. E.7 K0, K1, K2 with trajectory mass).

    Reflecting whenever each parent's mass is the sum of its children's,
    which :func:`trajectory_mass` guarantees (exactly for integer counts).
    """
    kernels: list[torch.Tensor | None] = []
    for v, f in enumerate(h.finer):
        kernels.append(None if f < 0 else mass[f] / mass[v].index_select(0, h.projection[v]))
    return tuple(kernels)


@dataclass(frozen=True)
class FiberPOHierarchy:
    """FiberPO as an FGH instance on any hierarchy (App. E.5.4 for one level, E.7 for three).

    ``trajectory`` is the stratum index that defines T_τ; ``gated_ratio`` is
    ``R ∘ G ∘ F`` (the map inside Eq. 29).  The token-level pieces (``length``,
    T_τ per token, and the full instance ``fgh`` with its N-sized token
    kernel and gate) are built on first use: the fused engine never needs
    them.  ``above`` is the instance on the strata above the tokens (the
    trajectories as its total space) where the fused engine applies, else
    ``None``.  Built by :func:`fiberpo_fgh`.
    """

    hierarchy: CompiledHierarchy
    trajectory: int
    eps: float
    above: FGH | None
    build: Callable[[torch.Tensor], FGH] = field(repr=False, compare=False)  # T_τ per token -> full instance
    dtype: torch.dtype = torch.float64
    process_group: object = None

    @cached_property
    def length(self) -> torch.Tensor:
        """T_τ of every token."""
        return hier.trajectory_length(self.hierarchy, self.trajectory, self.dtype)

    @cached_property
    def fgh(self) -> FGH:
        """The token-level FGH instance (mass kernels, aggregate gates, FiberPO's token gate)."""
        return self.build(self.length)

    def parts(self, log_ratio: torch.Tensor) -> FGHParts:
        return self.fgh.parts(decompose(log_ratio, self.length))

    def gated_ratio(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """R ∘ G ∘ F(r): by :func:`fused_gated_ratio` where it applies (tokens directly below the trajectories
        alone), else by the operator."""
        return self._gated_ratio(_validate.flat_values("log_ratio", log_ratio))

    def _gated_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`gated_ratio` of log-ratios already checked to be flat and finite (checked once per call)."""
        return _fused(self, x) if self.above is not None else self.operator_gated_ratio(x)

    def operator_gated_ratio(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """R ∘ G ∘ F(r) by the generic token-level operator :func:`fgh_operator` (the specification)."""
        return recover(self.parts(log_ratio).output, self.length)

    def regime_margin(self, parts: FGHParts) -> float:
        """Smallest distance of any gate argument to a regime boundary (C, (1+1/k)C or ε).

        Gradients are discontinuous there, so comparisons of gradients
        between two round-off-different evaluations need a positive margin.
        """
        margins = []
        for v, gate in enumerate(self.fgh.gates):
            a = gate.normalised(parts.residuals[v]).abs()
            if isinstance(gate, AggregateGate):
                rollback_at, zero_at = g_agg_thresholds(gate.budget, gate.tokens.unsqueeze(1))
                margins += [(a - rollback_at).abs().min(), (a - zero_at).abs().min()]
            else:
                margins.append((a - gate.eps).abs().min())
        return float(torch.stack(margins).min())

    def regimes(self, parts: FGHParts) -> dict[str, torch.Tensor]:
        """Gate regime of every element and channel, by stratum name (P=0, R=1, Z=2; clipped tokens: 2)."""
        return {name: self.fgh.gates[v].regime(parts.residuals[v]) for v, name in enumerate(self.hierarchy.names)}


def _fused_applies(h: CompiledHierarchy, trajectory: int) -> bool:
    """Whether the trajectories are the only stratum directly above the tokens (no turns, no side branch)."""
    return trajectory == h.total - 1 and h.coarser[h.total] == (trajectory,)


def _without_tokens(h: CompiledHierarchy) -> CompiledHierarchy:
    """The hierarchy of the strata above the tokens, the trajectories (stratum ``h.total - 1``) its total space.

    Its token counts stay the real ones (the k of every g_agg).
    """
    t = h.total - 1
    return CompiledHierarchy(
        h.names[:-1], h.sizes[:-1], h.finer[:t] + (-1,), h.stored_projection[:t] + (None,), h.element_ids[:-1],
        h.token_count[:-1],
    )


def _trajectory_segments(h: CompiledHierarchy, t: int) -> Segments:
    """The Segments the trajectory ids were indexed with, or (hierarchies from a graph, moved ones) rebuilt."""
    if h.segments and h.segments[t] is not None:
        return h.segments[t]
    index = h.projection[t]
    # dense indices, non-decreasing when the token ids were: segment_reduce by lengths applies
    contiguous = index.numel() < 2 or bool((index[1:] >= index[:-1]).all())
    return Segments(index=index, count=h.token_count[t], ids=h.element_ids[t], contiguous=contiguous, checked=True)


def fused_gated_ratio(instance: FiberPOHierarchy, log_ratio: torch.Tensor) -> torch.Tensor:
    """R ∘ G ∘ F(r) of a FiberPO hierarchy whose tokens hang off the trajectory stratum alone, by the fused gate.

    Engine: :class:`fiberpo_theory.core.fused.FiberGate` (token level, closed-form
    backward) around the FGH operator on the strata above the tokens.  With
    the mass kernels, the token stratum's part of Eq. 27 after R is
    FiberPO's fiber gate (Eq. 16) and the rest is ``log w_τ = T_τ (G_+ − G_−)``
    read off the trajectory stratum, where π_* F(r) = (log s⁺_τ, log s⁻_τ)
    (Eq. 9).  So :func:`fgh_operator` runs on the ``(M, 2)`` channel means,
    over M trajectories instead of N tokens, and is the same Eq. 26-28 as in
    :meth:`FiberPOHierarchy.operator_gated_ratio` (tested equal).  ``instance``
    must come from :func:`fiberpo_fgh` on such a hierarchy (``instance.above`` set).
    """
    if instance.above is None:
        raise ValueError(
            "instance: the fused engine needs the trajectories as the only stratum directly above the tokens "
            "and FiberPO's token gate"
        )
    return _fused(instance, _validate.flat_values("log_ratio", log_ratio))


def _fused(instance: FiberPOHierarchy, x: torch.Tensor) -> torch.Tensor:
    """:func:`fused_gated_ratio` on log-ratios already checked to be flat and finite."""
    h, t, above = instance.hierarchy, instance.trajectory, instance.above
    if x.shape[0] != h.sizes[h.total]:
        raise ValueError(f"log_ratio has {x.shape[0]} tokens but the hierarchy has {h.sizes[h.total]}")

    def log_base(channels: torch.Tensor) -> torch.Tensor:
        gated = above(channels)  # a density on the trajectories, mass 1 each: T_τ K_{n←τ} = 1
        return gated[:, 0] - gated[:, 1]

    return fiber_gated_ratio(x, _trajectory_segments(h, t), log_base, instance.eps)


def _budgets(name: str, value, strata: Sequence[str]) -> tuple[float, ...]:
    """One positive budget per stratum above the tokens: a number, a sequence, or a name → value mapping."""
    if isinstance(value, Mapping):
        if set(value) != set(strata):
            raise ValueError(f"{name} must give a budget for each of {list(strata)}, got keys {sorted(value)}")
        return tuple(_validate.positive(f"{name}[{s!r}]", value[s]) for s in strata)
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1):
        if len(value) != len(strata):
            raise ValueError(f"{name} must have one value per level ({len(strata)}: {list(strata)}), got {len(value)}")
        return tuple(_validate.positive(f"{name}[{k}]", c) for k, c in enumerate(value))
    return (_validate.positive(name, value),) * len(strata)


def fiberpo_fgh(
    h: CompiledHierarchy, *, trajectory, eps, c_pos, c_neg, dtype=torch.float64, validate=True, process_group=None
) -> FiberPOHierarchy:
    """Build the FiberPO FGH instance on hierarchy ``h``.

    Kernels weight every element by its trajectory mass (App. E.7: K0 by
    |Tj(g)|/|Tj(D)|, K1 = 1/|Tj(g)|, K2 = 1/T_τ); every stratum above the
    tokens gets an :class:`AggregateGate` with its own budgets, the tokens a
    :class:`FiberGate`.  Strata between trajectory and token (e.g. the turns
    of an agentic episode) and tree-shaped systems (Remark 6.5) are allowed.

    Args:
        h: the hierarchy.
        trajectory: stratum (name or index) whose elements are the trajectories.
        eps: token clip ε > 0 (Eq. 12).
        c_pos, c_neg: per-channel budgets; a number, one value per stratum above
            the tokens (in ``h.names`` order), or a mapping name → value.
        process_group: ``None`` (one process; no ``torch.distributed`` call) or the
            group of a data-parallel batch of which ``h`` holds this rank's tokens.
            The trajectory and token counts of the strata above the trajectories
            (App. E.7's |Tj(g)|, |Tj(D)|, T_g, T_D), hence their kernels and
            g_agg slopes k, are then whole-batch values, and so are their
            pushforwards in every evaluation (see the module docstring).
    """
    traj = h.index(trajectory) if isinstance(trajectory, str) else int(trajectory)
    if not 0 <= traj < h.total:
        raise ValueError(f"trajectory must name a stratum above the tokens, got {trajectory!r}")
    eps = _validate.positive("eps", eps)
    strata = h.names[:-1]
    pos, neg = _budgets("c_pos", c_pos, strata), _budgets("c_neg", c_neg, strata)
    budgets = [torch.tensor([pos[v], neg[v]], dtype=dtype, device=h.device) for v in range(h.total)]
    shared = hier.shared_strata(h, traj, process_group)
    counts = hier.global_counts(h, traj, process_group)
    options = dict(process_group=process_group, shared=shared)

    def build(length: torch.Tensor) -> FGH:  # T_τ: a trajectory lies on one rank
        return _mass_instance(h, traj, length, counts, budgets, lambda mass: FiberGate(mass, eps), dtype,
                              validate=validate, **options)

    above = None
    if _fused_applies(h, traj):
        sub = _without_tokens(h)
        one = torch.ones(h.sizes[traj], dtype=dtype, device=h.device)  # each trajectory weighs 1 (mass of App. E.7)
        traj_gate = lambda mass: AggregateGate(mass, counts[1][traj].to(dtype), budgets[traj])  # noqa: E731
        above = _mass_instance(sub, traj, one, counts, budgets, traj_gate, dtype, validate=False, **options)
    instance = FiberPOHierarchy(h, traj, eps, above, build, dtype, process_group)
    if validate:
        instance.fgh  # noqa: B018  Def. 6.2 (i) is checked when the token-level instance is built
    return instance


def _mass_instance(h, traj, length, counts, budgets, last_gate, dtype, **options) -> FGH:
    """Mass kernels and aggregate gates on every stratum but the last (App. E.7), ``last_gate(mass)`` on the last.

    ``length`` is the per-element T_τ of the last stratum (its mass is 1/T_τ); ``counts`` the
    ``(trajectory_count, token_count)`` of :func:`~fiberpo_theory.hierarchy.structure.global_counts`.
    """
    trajectory_count, token_count = counts
    mass = trajectory_mass(h, traj, dtype=dtype, length=length, trajectory_count=trajectory_count)
    gates = [AggregateGate(mass[v], token_count[v].to(dtype), budgets[v]) for v in range(h.total)]
    return FGH(h, mass_kernels(h, mass), tuple(gates) + (last_gate(mass[h.total]),), **options)


def fiberpo_hierarchy_gated_ratio(log_ratio, level_ids, *, eps, c_pos, c_neg, process_group=None) -> torch.Tensor:
    """FiberPO on a chain hierarchy of any depth, the FGH instance of Eq. 26-29.

    Engine: :func:`fused_gated_ratio` (the fused token gate around the
    operator on the strata above the tokens), equal to the token-level
    :func:`fgh_operator` (:meth:`FiberPOHierarchy.operator_gated_ratio`).

    ``level_ids`` lists per-token id tensors from the coarsest level to the
    trajectory level: ``[traj_id]`` is FiberPO (Eq. 80), ``[domain_id,
    group_id, traj_id]`` is FiberPO-Domain (Eq. 30-33); the trajectory level
    may be a ready ``Segments`` (the one μ is built from, too).  Above the
    trajectory level the kernels weight children by trajectory count, so each
    element's aggregate is the mean of log s_τ over the trajectories below it;
    each level's g_agg uses the element's token count as k.  ``c_pos`` and
    ``c_neg`` are a number or one value per level (coarsest first).

    ``process_group``: ``None`` for one process (no ``torch.distributed``
    call).  Otherwise the inputs are this rank's shard of a data-parallel
    batch, and the levels above the trajectory use whole-batch aggregates
    (Eq. 26-28 on the concatenated batch, App. E.7): their pushforwards,
    trajectory counts and token counts are summed over the ranks by id.
    Every trajectory must lie on one rank (trajectory ids are only compared
    within a rank); the ids of the levels above are global and must nest
    globally (checked).  See :mod:`fiberpo_theory.core.distributed`.
    """
    x = _validate.flat_values("log_ratio", log_ratio)
    h = hier.from_ids(level_ids, like=x)
    instance = fiberpo_fgh(
        h, trajectory=h.total - 1, eps=eps, c_pos=c_pos, c_neg=c_neg, dtype=x.dtype, validate=False,
        process_group=process_group,
    )
    return instance._gated_ratio(x)


def fiberpo_tree_gated_ratio(
    log_ratio, columns, finer, *, trajectory="trajectory", eps, c_pos, c_neg, process_group=None
) -> torch.Tensor:
    """FiberPO on a tree of strata (Remark 6.5), e.g. domain and modality side by side above trajectories.

    Engine: :meth:`FiberPOHierarchy.gated_ratio` (fused when the trajectories
    are the only stratum directly above the tokens, the operator otherwise).

    ``columns`` and ``finer`` are as in :func:`~fiberpo_theory.hierarchy.from_tree`;
    budgets are a number or a mapping stratum name → value.  ``process_group``:
    as in :func:`fiberpo_hierarchy_gated_ratio`; every stratum must then lie
    above the trajectories or between them and the tokens.
    """
    x = _validate.flat_values("log_ratio", log_ratio)
    h = hier.from_tree(columns, finer, like=x)
    instance = fiberpo_fgh(
        h, trajectory=trajectory, eps=eps, c_pos=c_pos, c_neg=c_neg, dtype=x.dtype, validate=False,
        process_group=process_group,
    )
    return instance._gated_ratio(x)


def fgh_surrogate(log_ratio, advantages, instance: FiberPOHierarchy, weights=None) -> torch.Tensor:
    """The FGH surrogate Ĵ = Σ_i μ_i R∘G∘F(r)_i Â_i (Eq. 29).

    ``weights`` defaults to μ_i = 1/(|Tj| T_τ) (Eq. 30, 82), with |Tj| counted
    over all ranks when ``instance`` was built with a ``process_group``; the
    sum is then over this rank's tokens, and the ranks' values add up to Ĵ.
    """
    x = _validate.flat_values("log_ratio", log_ratio)
    gated = instance._gated_ratio(x)
    if weights is None:
        n_traj = _trajectory_total(instance)
        weights = 1.0 / (n_traj * instance.length.to(gated.dtype))
    return rgf_objective(gated, advantages, weights)


def _trajectory_total(instance: FiberPOHierarchy) -> int:
    """|Tj| of the whole batch: trajectories lie on one rank each, so the ranks' counts add up."""
    h = instance.hierarchy
    local = torch.tensor([h.sizes[instance.trajectory]], device=h.device)
    (total,) = global_segment_sums(torch.zeros_like(local), local, process_group=instance.process_group)
    return int(total)
