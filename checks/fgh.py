"""Claim checks for fibration hierarchies and the FGH operator (Sec. 4.2, 6; App. E.5.4, E.7).

Each check searches random hierarchies (depth 1-6, single-child and
unbalanced fibres, length-1 trajectories, log-ratios from exactly 0 to ±5)
with budgets aimed at every g_agg regime, runs the implementation under test
(keyword arguments, defaulting to the package), and compares it with what the
paper states.  Counterexamples are re-checked with an independent evaluation:
dense matrices, exact fractions, plain-Python formulas or finite differences.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import torch
from hypothesis import strategies as st

from fiberpo_theory.hierarchy import fgh
from fiberpo_theory import hierarchy as hier
from fiberpo_theory.theory import strategies as fst
from fiberpo_theory.theory.claims import Outcome, Profile, claim
from fiberpo_theory.core.gates import g_agg, g_agg_regime, symmetric_clip
from fiberpo_theory.core.objectives import fiberpo_domain_gated_ratio, fiberpo_gated_ratio, fiberpo_parts
from fiberpo_theory.core.segments import Segments

from ._outcomes import from_search, merged_regimes
from ._search_tools import Falsified, SearchResult, search

REL = 1e-12  # float64 round-off allowance for quantities of order 1
LEVEL_NAMES = {1: ("trajectory",), 3: ("domain", "group", "trajectory")}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


class _ShrinkBudgetSpent(BaseException):
    """Escapes Hypothesis (which only catches ``Exception``) to end shrinking early."""


def _search(profile: Profile, strategy, prop, *, salt: int, shrink_calls: int = 300) -> SearchResult:
    """``_search_tools.search`` with a budget for shrinking.

    Hypothesis shrinks for as long as it finds smaller failing examples;
    with autograd in the property and hierarchies drawn from hundreds of
    choices, that can take minutes.  After ``shrink_calls`` property calls
    past the first failure the search stops and reports the smallest failing
    example found so far.  The budget counts calls, not seconds, so the
    witness does not depend on how loaded the machine is (a 1.5 s budget
    stopped eq-e5-fbg's shrink at 46 calls / 1.37 s on one run, a hair from
    the limit).  ``examples`` counts the examples generated up to and
    including the first failure; ``regimes`` counts their labels.
    """
    state = {"failed": False, "shrink_calls": 0, "examples": 0, "witness": None, "message": ""}
    regimes: Counter = Counter()

    def wrapped(example):
        if state["failed"]:
            state["shrink_calls"] += 1
            if state["shrink_calls"] > shrink_calls:
                raise _ShrinkBudgetSpent()
        try:
            labels = list(prop(example))
        except Falsified as failure:
            if not state["failed"]:
                state["failed"], state["examples"] = True, state["examples"] + 1
            state["witness"], state["message"] = failure.witness, str(failure)
            raise
        if not state["failed"]:
            state["examples"] += 1
            regimes.update(labels)
        return labels

    try:
        result = search(profile, strategy, wrapped, salt=salt)
    except _ShrinkBudgetSpent:
        return SearchResult(state["examples"], dict(regimes), state["witness"], state["message"])
    return SearchResult(state["examples"], dict(regimes), result.witness, result.message)


def _ids(levels) -> list[list[int]]:
    return [ids.tolist() for ids in levels]


def _level_name(depth: int, v: int) -> str:
    if v == depth:
        return "token"
    return LEVEL_NAMES.get(depth, tuple(f"level{k}" for k in range(depth - 1)) + ("trajectory",))[v]


def _python_g_agg(x: float, c: float, k: float) -> float:
    """Eq. 10 / 78 in plain Python (independent of the torch gates)."""
    if abs(x) <= c:
        return x
    if abs(x) < (1 + 1 / k) * c:
        return math.copysign((k + 1) * c, x) - k * x
    return 0.0


def _python_clip(x: float, bound: float) -> float:
    return min(max(x, -bound), bound)


def python_fiberpo_chain(x, levels, eps, c_pos, c_neg) -> list[float]:
    """FiberPO on a chain written token by token in plain Python, from Eq. 31-33 and Eq. 32.

    ``levels`` are per-token id lists, coarsest first, trajectory last;
    ``c_pos``/``c_neg`` one budget per level.  Depth 1 is Eq. 80, depth 3 is
    Eq. 30-33.  Used only to re-check counterexamples.
    """
    traj = levels[-1]
    members: dict[int, list[int]] = {}
    for i, t in enumerate(traj):
        members.setdefault(t, []).append(i)
    s = {t: (sum(max(x[i], 0.0) for i in idx) / len(idx), sum(max(-x[i], 0.0) for i in idx) / len(idx)) for t, idx in members.items()}
    aggregates, tokens = [], []
    for ids in levels:
        trajs: dict[int, set] = {}
        count: dict[int, int] = {}
        for i, e in enumerate(ids):
            trajs.setdefault(e, set()).add(traj[i])
            count[e] = count.get(e, 0) + 1
        aggregates.append({e: tuple(sum(s[t][c] for t in ts) / len(ts) for c in (0, 1)) for e, ts in trajs.items()})
        tokens.append(count)
    out = []
    for i, xi in enumerate(x):
        log_w = 0.0
        parent = (0.0, 0.0)
        for k, ids in enumerate(levels):
            agg = aggregates[k][ids[i]]
            t_k = tokens[k][ids[i]]
            log_w += _python_g_agg(agg[0] - parent[0], c_pos[k], t_k) - _python_g_agg(agg[1] - parent[1], c_neg[k], t_k)
            parent = agg
        l = 1.0 if xi >= 0 else -1.0
        same, opposite = s[traj[i]][0 if l > 0 else 1], s[traj[i]][1 if l > 0 else 0]
        log_residual = _python_clip(xi - l * same, eps) - _python_clip(-l * opposite, eps)  # Eq. 32 in log space
        out.append(math.exp(log_w + log_residual))
    return out


def _per_level(value, depth: int) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, tuple) else (float(value),) * depth


def _structure_labels(example) -> list[str]:
    return example.features()


# ---------------------------------------------------------------------------
# reflecting
# ---------------------------------------------------------------------------


def _package_kernels(h: hier.CompiledHierarchy):
    """The kernels the package's FiberPO instance uses (App. E.5.4 for depth 1, E.7 for depth 3)."""
    return fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=1.0, c_pos=1.0, c_neg=1.0).fgh.kernels


def _literal_kernels(levels) -> list[torch.Tensor]:
    """App. E.7's kernels from counts: |Tj(child)| / |Tj(parent)| above trajectories, 1/T_τ on tokens.

    Children are ordered by sorted id, the order of the compiled hierarchy.
    """
    traj = levels[-1]
    out = []
    for k in range(len(levels) - 1):
        parent, child = levels[k], levels[k + 1]
        pairs = torch.unique(torch.stack([child, traj]), dim=1)  # one column per (child, trajectory)
        child_traj = torch.unique(pairs[0], return_counts=True)[1]  # |Tj(child)|, children in id order
        parent_of_child = Segments.from_ids(parent).index[_first(child)]
        parent_traj = torch.zeros(int(parent_of_child.max()) + 1, dtype=torch.long).index_add(0, parent_of_child, child_traj)
        out.append(child_traj.double() / parent_traj[parent_of_child].double())
    out.append(1.0 / Segments.from_ids(traj).gather(Segments.from_ids(traj).count).double())
    return out


def _first(ids: torch.Tensor) -> torch.Tensor:
    seg = Segments.from_ids(ids)
    first = torch.full((seg.size,), ids.numel(), dtype=torch.long)
    return first.scatter_reduce(0, seg.index, torch.arange(ids.numel()), reduce="amin")


def _reflecting_property(kernels_for, operator, tally):
    def prop(example):
        levels = example.level_ids
        h = hier.from_ids(levels)
        kernels = kernels_for(h)
        literal = _literal_kernels(levels)
        depth = h.total
        for v in range(depth):
            kernel = kernels[v].double()
            gap = float((kernel - literal[v]).abs().max())
            fibre = torch.zeros(h.sizes[v], dtype=torch.float64).index_add(0, h.projection[v], kernel)
            defect = float((fibre - 1).abs().max()) if bool((kernel >= 0).all()) else math.inf
            tally["kernel_gap"] = max(tally["kernel_gap"], gap)
            tally["reflect_defect"] = max(tally["reflect_defect"], defect)
            if not (gap <= 4e-16 and defect <= REL):
                bad = int((fibre - 1).abs().argmax())
                members = (h.projection[v] == bad).nonzero().flatten()
                raise Falsified(
                    f"stratum {_level_name(depth, v)}: π_* K deviates from id by {defect:.3g}, "
                    f"kernel differs from App. E.7's by {gap:.3g}",
                    {
                        "level_ids": _ids(levels),
                        "stratum": _level_name(depth, v),
                        "parent_element": int(h.ids[v][bad]),
                        "kernel_on_fibre": kernel[members].tolist(),
                        "app_e7_kernel_on_fibre": literal[v][members].tolist(),
                        "fibre_sum_exact": str(sum(Fraction(w) for w in kernel[members].tolist())),
                    },
                )
        sigma = fgh.decompose(example.log_ratio, Segments.from_ids(levels[-1]).gather(Segments.from_ids(levels[-1]).count).double())
        identity = (lambda r, ctx: r,) * len(h.names)
        parts = operator(sigma, h, kernels, identity)
        scale = 1.0 + float(sigma.abs().sum())
        for v in range(1, depth + 1):
            pushed = hier.sum_children(parts.residuals[v], h.projection[v - 1], h.sizes[v - 1])
            worst = float(pushed.abs().max())
            tally["residual_push"] = max(tally["residual_push"], worst / scale)
            if worst > REL * scale:
                raise Falsified(
                    f"residual on stratum {_level_name(depth, v)} pushes forward to {worst:.3g}, not 0",
                    {"level_ids": _ids(levels), "log_ratio": example.log_ratio.tolist(), "stratum": _level_name(depth, v), "pushforward": pushed.tolist()},
                )
        return _structure_labels(example)

    return prop


@claim("reflecting", "Def. 4.3 item 3, Def. 6.2 condition (i), App. E.5.4, App. E.7", "property",
       "The kernels of App. E.5.4 (K = 1/T_τ) and App. E.7 (K0 = |Tj(g)|/|Tj(D)|, K1 = 1/|Tj(g)|, K2 = 1/T_τ), "
       "and their trajectory-count extension to any depth, satisfy π_* ∘ K = id; hence every residual "
       "σ_k − K_{k−1} π_k* σ_k pushes forward to 0.")
def check_reflecting(profile: Profile, *, kernels_for=_package_kernels, operator=fgh.fgh_operator) -> Outcome:
    tally = {"kernel_gap": 0.0, "reflect_defect": 0.0, "residual_push": 0.0}
    result = _search(profile, fst.fgh_examples(max_tokens=30), _reflecting_property(kernels_for, operator, tally), salt=601)
    searched = (
        f"{result.examples} random hierarchies of depth 1-6; largest kernel gap to App. E.7's formula "
        f"{tally['kernel_gap']:.2g}, largest |π_* K − id| {tally['reflect_defect']:.2g}, largest residual "
        f"pushforward {tally['residual_push']:.2g} (relative)"
    )
    return from_search(result, searched, recheck=_recheck_fibre_sum)


def _recheck_fibre_sum(witness) -> dict:
    """Exact rational re-check of the kernel column that failed (when the witness names one)."""
    if "fibre_sum_exact" not in witness:
        return {}
    return {"fibre_sum_is_one": Fraction(witness["fibre_sum_exact"]) == 1}


# ---------------------------------------------------------------------------
# remark-6.3: FGH with n = 1 is FBG (Eq. 4)
# ---------------------------------------------------------------------------


@st.composite
def fbg_instances(draw):
    """A one-level hierarchy, a random reflecting kernel, random pointwise gates and a random density."""
    sample = draw(fst.hierarchies(min_depth=1, max_depth=1, max_tokens=30))
    n = sample.n_tokens
    weights = draw(st.lists(st.floats(0.05, 20.0), min_size=n, max_size=n))
    family = draw(st.sampled_from(("fiberpo", "smooth", "context")))
    params = draw(st.tuples(st.floats(0.01, 2.0), st.floats(0.01, 2.0), st.floats(-2.0, 2.0), st.integers(1, 50)))
    density = draw(st.lists(st.floats(-3.0, 3.0), min_size=2 * n, max_size=2 * n))
    return dict(sample=sample, weights=weights, family=family, params=params, density=density)


def _fbg_gates(family, params):
    c, eps, a, k = params
    if family == "fiberpo":
        return (lambda p: g_agg(p, c, float(k))), (lambda r, p, proj: symmetric_clip(r, eps))
    if family == "smooth":
        return (lambda p: torch.tanh(a * p) + c * p), (lambda r, p, proj: r + a * torch.sin(r) * eps)
    return (lambda p: torch.tanh(a * p) + c * p), (lambda r, p, proj: r * (1 + a * p.index_select(0, proj)) + eps * p.index_select(0, proj))


def _dense_eq4(sigma, traj_index, n_traj, kernel_weights, base_gate, fiber_gate):
    """Eq. 4 with dense matrices: G = K g_B(P σ) + g_F(σ − K P σ; P σ)."""
    n = sigma.shape[0]
    P = torch.zeros(n_traj, n, dtype=torch.float64)
    P[traj_index, torch.arange(n)] = 1.0
    K = (P * kernel_weights).T
    K = K / K.sum(0, keepdim=True)
    base = P @ sigma
    return K @ base_gate(base) + fiber_gate(sigma - K @ base, base, traj_index)


def _remark_6_3_property(operator, tally):
    def prop(inst):
        levels = list(inst["sample"].level_ids)
        h = hier.from_ids(levels)
        sigma = torch.tensor(inst["density"], dtype=torch.float64).view(-1, 2)
        weight = torch.tensor(inst["weights"], dtype=torch.float64)
        base_gate, fiber_gate = _fbg_gates(inst["family"], inst["params"])
        kernel = hier.weighted_kernel(h, 0, weight)
        proj = h.projection[0]
        gates = (lambda r, ctx: base_gate(r), lambda r, ctx: fiber_gate(r, ctx.pushforwards[0], proj))
        got = operator(sigma, h, (kernel, None), gates).output
        want = _dense_eq4(sigma, proj, h.sizes[0], weight, base_gate, fiber_gate)
        gap = float((got - want).abs().max())
        scale = 1.0 + float(want.abs().max())
        tally["gap"] = max(tally["gap"], gap / scale)
        if not gap <= REL * scale:
            raise Falsified(
                f"FGH(n=1) differs from Eq. 4 by {gap:.3g} ({inst['family']} gates)",
                {
                    "traj_id": _ids(levels)[0],
                    "kernel_weights": inst["weights"],
                    "gate_family": inst["family"],
                    "gate_params": list(inst["params"]),
                    "density": inst["density"],
                    "fgh": got.tolist(),
                    "eq4_dense": want.tolist(),
                },
            )
        return inst["sample"].features() + [f"gates:{inst['family']}"]

    return prop


@claim("remark-6.3", "Remark 6.3, Eq. 4, Eq. 26-28", "property",
       "With n = 1 the FGH gating function (Eq. 26) is the FBG gating function K g_Base(π_*σ) + g_Fiber(σ − K π_*σ) (Eq. 4).")
def check_remark_6_3(profile: Profile, *, operator=fgh.fgh_operator) -> Outcome:
    tally = {"gap": 0.0}
    result = _search(profile, fbg_instances(), _remark_6_3_property(operator, tally), salt=603)
    searched = (
        f"{result.examples} one-level instances with random reflecting kernels and three gate families "
        f"(FiberPO gates, smooth gates, fiber gates reading the base density); largest relative gap "
        f"to a dense-matrix evaluation of Eq. 4: {tally['gap']:.2g}"
    )
    return from_search(result, searched)


# ---------------------------------------------------------------------------
# eq-31-fgh: the E.7 objects reproduce FiberPO-Domain
# ---------------------------------------------------------------------------


def _regime_labels(example, depth: int):
    h = hier.from_ids(example.level_ids)
    inst = fgh.fiberpo_fgh(h, trajectory=depth - 1, eps=example.eps, c_pos=example.c_pos, c_neg=example.c_neg)
    labels = []
    for v, codes in enumerate(inst.regimes(inst.parts(example.log_ratio)).values()):
        name = _level_name(depth, v)
        names = ("P", "clipped", "clipped") if v == depth else ("P", "R", "Z")
        labels += [f"{name}:{names[c]}" for c in codes.unique().tolist()]
    return labels, inst


def _eq31_property(gated_ratio, closed_form, tally):
    def prop(example):
        domain, group, traj = example.level_ids
        kw = dict(eps=example.eps, c_pos=example.c_pos, c_neg=example.c_neg)
        x = example.log_ratio.clone().requires_grad_()
        got = gated_ratio(x, [domain, group, traj], **kw)
        y = example.log_ratio.clone().requires_grad_()
        want = closed_form(y, traj, group, domain, **kw)
        gap = float(((got - want).abs().max() / want.abs().max().clamp(min=1e-300)).detach())
        tally["value"] = max(tally["value"], gap)
        labels, inst = _regime_labels(example, 3)
        adv = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64)
        (got * adv).sum().backward()
        (want * adv).sum().backward()
        margin = inst.regime_margin(inst.parts(example.log_ratio))
        grad_gap = float((x.grad - y.grad).abs().max() / (1 + y.grad.abs().max())) if margin > 1e-9 else 0.0
        tally["grad"] = max(tally["grad"], grad_gap)
        tally["grad_compared"] += int(margin > 1e-9)
        if not (gap <= REL and grad_gap <= 1e-10):
            raise Falsified(
                f"FGH(E.7) and Eq. 31×32 differ: value {gap:.3g} (relative), gradient {grad_gap:.3g}",
                {
                    "log_ratio": example.log_ratio.tolist(),
                    "domain_id": domain.tolist(),
                    "group_id": group.tolist(),
                    "traj_id": traj.tolist(),
                    **kw,
                    "fgh": got.tolist(),
                    "closed_form": want.tolist(),
                },
            )
        return example.features() + labels

    return prop


def _recheck_with_python(witness, levels_keys):
    levels = [witness[k] for k in levels_keys]
    depth = len(levels)
    ref = python_fiberpo_chain(witness["log_ratio"], levels, witness["eps"], _per_level(witness["c_pos"], depth), _per_level(witness["c_neg"], depth))
    close = lambda a: max(abs(p - q) / max(abs(q), 1e-300) for p, q in zip(a, ref)) <= 1e-9  # noqa: E731
    return {"python_reference": ref, "fgh_agrees_with_reference": close(witness["fgh"]), "closed_form_agrees_with_reference": close(witness["closed_form"])}


@claim("eq-31-fgh", "App. E.7, Eq. 30-33, Eq. 26-29", "property",
       "The FGH objects of App. E.7 (strata Domain/PromptGroup/Tj/X̄ × {±1}, kernels K0-K2, four atomic gates, F, R) "
       "reproduce FiberPO-Domain: R∘G∘F(r)_i = w_i^Base · r̃_i^Fiber (Eq. 31 × Eq. 32).")
def check_eq_31_fgh(profile: Profile, *, gated_ratio=fgh.fiberpo_hierarchy_gated_ratio, closed_form=fiberpo_domain_gated_ratio) -> Outcome:
    tally = {"value": 0.0, "grad": 0.0, "grad_compared": 0}
    strategy = fst.aimed_fgh_examples(min_depth=3, max_depth=3, max_tokens=30, scalar_budgets=True)
    result = _search(profile, strategy, _eq31_property(gated_ratio, closed_form, tally), salt=631)
    searched = (
        f"{result.examples} random domain/group/trajectory hierarchies with budgets aimed at every g_agg regime; "
        f"largest relative value gap {tally['value']:.2g}; gradients compared on {tally['grad_compared']} "
        f"(away from regime boundaries), largest gap {tally['grad']:.2g}"
    )
    return from_search(result, searched, recheck=lambda w: _recheck_with_python(w, ("domain_id", "group_id", "traj_id")))


# ---------------------------------------------------------------------------
# fgh-first-order: identity value and Jacobian at r = 1 for any depth
# ---------------------------------------------------------------------------

FIRST_ORDER_FAMILIES = ("fiberpo", "smooth", "context-vanishing", "context")


@st.composite
def on_policy_instances(draw, families=FIRST_ORDER_FAMILIES[:3]):
    """A random hierarchy (depth 1-6), a gate family, its parameters and random kernel weights."""
    example = draw(fst.fgh_examples(max_tokens=16, styles=["on-policy"]))
    family = draw(st.sampled_from(families))
    strength = draw(st.floats(0.05, 3.0)) * draw(st.sampled_from((1.0, -1.0)))
    seed_ = draw(st.integers(0, 2**31 - 1))
    return dict(example=example, family=family, strength=strength, seed=seed_)


def _context_gate(h, v, strength, vanishing):
    """A gate with identity value and unit slope at the on-policy residual 0 that also reads p_<v.

    ``vanishing``: g(ρ; p) = ρ (1 + b p̄), whose p-derivative is 0 at ρ = 0;
    otherwise g(ρ; p) = ρ + b p̄, whose p-derivative is b (p̄ is the density of
    the stratum directly coarser than v, carried down to v's elements).
    """
    coarser = h.coarser[v]

    def gate(residual, ctx):
        if not coarser:
            return residual
        c = coarser[0]
        parent = ctx.pushforwards[c].index_select(0, h.projection[c])
        return residual * (1 + strength * parent) if vanishing else residual + strength * parent

    return gate


def _first_order_instance(inst):
    """Hierarchy, kernels, gates and token lengths of one on-policy instance."""
    ex = inst["example"]
    h = hier.from_ids(ex.level_ids)
    base = fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=ex.eps, c_pos=ex.c_pos, c_neg=ex.c_neg)
    family = inst["family"]
    if family == "fiberpo":
        return h, base.fgh.kernels, base.fgh.gates, base.length
    gen = torch.Generator().manual_seed(inst["seed"])
    kernels = tuple(hier.weighted_kernel(h, v, torch.rand(h.sizes[h.finer[v]], generator=gen, dtype=torch.float64) + 0.1) for v in range(h.total)) + (None,)
    if family == "smooth":
        b = inst["strength"]
        gates = tuple((lambda r, ctx, b=b: r + b * r * r - torch.sin(r) + r) for _ in h.names)  # g(0)=0, g'(0)=1
    else:
        gates = tuple(_context_gate(h, v, inst["strength"], family == "context-vanishing") for v in range(len(h.names)))
    return h, kernels, gates, base.length


def _first_order_map(inst, operator, decompose, recover):
    h, kernels, gates, length = _first_order_instance(inst)
    return lambda x: recover(operator(decompose(x, length), h, kernels, gates).output, length)


def _first_order_property(operator, decompose, recover, tally):
    def prop(inst):
        f = _first_order_map(inst, operator, decompose, recover)
        n = inst["example"].log_ratio.numel()
        zero = torch.zeros(n, dtype=torch.float64)
        value_gap = float((f(zero) - 1).abs().max())
        jac = torch.autograd.functional.jacobian(f, zero, vectorize=True)
        jac_gap = float((jac - torch.eye(n, dtype=torch.float64)).abs().max())
        family = inst["family"]
        tally[family] = max(tally.get(family, 0.0), value_gap, jac_gap)
        labels = inst["example"].sample.features() + [f"gates:{family}"]
        if value_gap <= REL and jac_gap <= REL:
            return labels
        witness = {
            "level_ids": _ids(inst["example"].level_ids),
            "gate_family": family,
            "strength": inst["strength"],
            "kernel_seed": inst["seed"],
            "eps": inst["example"].eps,
            "c_pos": inst["example"].c_pos,
            "c_neg": inst["example"].c_neg,
            "value_minus_one_max": value_gap,
            "jacobian_minus_identity_max": jac_gap,
            "jacobian": jac.tolist(),
        }
        raise Falsified(f"{family} gates: |G(1) − 1| = {value_gap:.3g}, |J − I| = {jac_gap:.3g} at r = 1", witness)

    return prop


def _finite_difference_jacobian(f, n: int, step: float = 1e-6) -> torch.Tensor:
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([(f(step * eye[j]) - f(-step * eye[j])) / (2 * step) for j in range(n)], dim=1)


def _recheck_first_order(witness, operator, decompose, recover):
    levels = [torch.tensor(ids) for ids in witness["level_ids"]]
    sample = fst.HierarchySample(tuple(levels), (), ())
    example = fst.FGHExample(sample, torch.zeros(levels[0].numel(), dtype=torch.float64), witness["eps"], witness["c_pos"], witness["c_neg"], "on-policy")
    inst = dict(example=example, family=witness["gate_family"], strength=witness["strength"], seed=witness["kernel_seed"])
    f = _first_order_map(inst, operator, decompose, recover)
    fd = _finite_difference_jacobian(f, levels[0].numel())
    return float((fd - torch.eye(fd.shape[0], dtype=torch.float64)).abs().max())


@claim("fgh-first-order", "Sec. 6.2 (first-order agreement for FGH), Theorem 4.5, Def. 6.2 Object 3", "property",
       "For an FGH of any depth whose atomic gates satisfy the identity conditions at the on-policy density "
       "(g(ρ*) = ρ*, g'(ρ*) = 1), R∘G∘F has value 1 and identity Jacobian at r = 1, so the FGH surrogate "
       "agrees with the true objective to first order.")
def check_fgh_first_order(profile: Profile, *, operator=fgh.fgh_operator, decompose=fgh.decompose, recover=fgh.recover) -> Outcome:
    tally: dict[str, float] = {}
    prop = _first_order_property(operator, decompose, recover, tally)
    result = _search(profile, on_policy_instances(), prop, salt=641)
    # gates that read p_<k with a non-zero p-derivative: outside the claim's proof, searched separately
    context = _search(profile, on_policy_instances(families=("context",)), prop, salt=642)
    examples = result.examples + context.examples
    regimes = merged_regimes(result, context)
    worst = ", ".join(f"{k}: {v:.2g}" for k, v in sorted(tally.items()))
    searched = (
        f"{examples} random hierarchies of depth 1-6 at r = 1 (autograd Jacobian, float64): {result.examples} with "
        f"FiberPO gates, smooth context-free gates on random reflecting kernels, or gates reading p_<k with zero "
        f"p-derivative at r = 1; {context.examples} with gates g(ρ; p) = ρ + b·p̄ reading the lower strata "
        f"(Def. 6.2 Object 3); largest |G − 1| or |J − I| per family: {worst}"
    )
    def recheck(witness):
        return {"finite_difference_max_deviation": _recheck_first_order(witness, operator, decompose, recover)}

    if result.falsified or not context.falsified:
        return from_search(result, searched, recheck=recheck, examples=examples, regimes=regimes)
    return from_search(
            context,
            "identity value and Jacobian hold for every context-free gate family and for context gates whose "
            "p_<k-derivative vanishes at r = 1; a gate g(ρ; p) = ρ + b·p̄ meets the stated identity conditions "
            f"(value and slope in ρ) yet moves the Jacobian away from I. {searched}",
            recheck=recheck,
            examples=examples,
            condition=(
                "the atomic gates either ignore the lower-strata densities p_<k or have zero derivative in p_<k at the "
                "on-policy point (FiberPO's gates ignore them); the identity conditions of Thm 4.5 constrain only the "
                "derivative in the gate's own argument"
            ),
            regimes=regimes,
        )


# ---------------------------------------------------------------------------
# eq-e5-fbg: the E.5.4 objects reproduce Eq. 79 / Eq. 80
# ---------------------------------------------------------------------------


def _e54_objects(batch):
    """The FBG objects of App. E.5.4 as written there: K = 1/T_τ, g_Base = g_agg(·, C^(l), T_τ), g_Fiber = clip(·, ±ε/T_τ)."""
    h = hier.from_ids([batch.traj_id])
    traj = Segments.from_ids(batch.traj_id)
    length = traj.gather(traj.count).double()
    t_traj = traj.count.double().unsqueeze(1)
    budget = torch.tensor([batch.c_pos, batch.c_neg], dtype=torch.float64)
    gates = (lambda s, ctx: g_agg(s, budget, t_traj), lambda s, ctx: symmetric_clip(s, batch.eps / length.unsqueeze(1)))
    return h, (1.0 / length, None), gates, length


def _eq79(batch) -> torch.Tensor:
    """Eq. 79: l clip(l x − log s^(l), ε) + l g_agg(log s^(l), C^(l), T_τ), per token."""
    parts = fiberpo_parts(batch.log_ratio, batch.traj_id, eps=batch.eps, c_pos=batch.c_pos, c_neg=batch.c_neg)
    l = parts.sign
    s_pos, s_neg = parts.traj.gather(parts.log_s_pos), parts.traj.gather(parts.log_s_neg)
    own = torch.where(l > 0, s_pos, s_neg)
    c_own = torch.where(l > 0, torch.full_like(own, batch.c_pos), torch.full_like(own, batch.c_neg))
    return l * symmetric_clip(l * batch.log_ratio - own, batch.eps) + l * g_agg(own, c_own, parts.traj.gather(parts.length))


def _e54_labels(batch) -> list[str]:
    parts = fiberpo_parts(batch.log_ratio, batch.traj_id, eps=batch.eps, c_pos=batch.c_pos, c_neg=batch.c_neg)
    labels = [f"aimed C+:{batch.target[0]}", f"aimed C-:{batch.target[1]}", f"log-ratio:{batch.style}"]
    for name, agg, c in (("+", parts.log_s_pos, batch.c_pos), ("-", parts.log_s_neg, batch.c_neg)):
        labels += [f"g_agg{name}:{'PRZ'[r]}" for r in g_agg_regime(agg, c, parts.length).unique().tolist()]
    if bool((parts.u.abs() > batch.eps).any()):
        labels.append("fiber clip active")
    if bool((parts.length == 1).any()):
        labels.append("T=1")
    return labels


def _e54_property(operator, decompose, recover, closed_form, tally, literal=None):
    """Eq. 80 and scaled Eq. 79 must hold; with ``literal`` the unscaled verification line must hold too."""

    def prop(batch):
        h, kernels, gates, length = _e54_objects(batch)
        density = operator(decompose(batch.log_ratio, length), h, kernels, gates).output
        gated = recover(density, length)
        want = closed_form(batch.log_ratio, batch.traj_id, eps=batch.eps, c_pos=batch.c_pos, c_neg=batch.c_neg)
        eq80_gap = float(((gated - want).abs() / want.abs().clamp(min=1e-300)).max())
        l = torch.where(batch.log_ratio >= 0, 1.0, -1.0).double()
        own = torch.where(l > 0, density[:, 0], density[:, 1])
        eq79 = _eq79(batch)
        eq79_gap = float((length * l * own - eq79).abs().max())
        literal_gap = float((own - l * eq79).abs().max())
        tally["eq80"], tally["eq79"] = max(tally["eq80"], eq80_gap), max(tally["eq79"], eq79_gap)
        numbers = {
            "log_ratio": batch.log_ratio.tolist(),
            "traj_id": batch.traj_id.tolist(),
            "eps": batch.eps,
            "c_pos": batch.c_pos,
            "c_neg": batch.c_neg,
        }
        if not (eq80_gap <= REL and eq79_gap <= REL * (1 + float(eq79.abs().max()))):
            raise Falsified(
                f"E.5.4 objects: R∘G∘F vs Eq. 80 gap {eq80_gap:.3g}, T·l·G(σ)_(i,l_i) vs Eq. 79 gap {eq79_gap:.3g}",
                {**numbers, "fgh": gated.tolist(), "closed_form": want.tolist(), "eq79": eq79.tolist(), "T_l_G_own": (length * l * own).tolist()},
            )
        if literal and literal_gap > REL * (1 + float(eq79.abs().max())):
            raise Falsified(
                f"G(σ)_(i,l_i) differs from l_i × Eq. 79 by {literal_gap:.3g}",
                {**numbers, "G_own_channel": own.tolist(), "l_times_eq79": (l * eq79).tolist(), "T": length.tolist()},
            )
        return _e54_labels(batch)

    return prop


@claim("eq-e5-fbg", "App. E.5.4 (FBG objects, 'Verification'), Eq. 79, Eq. 80", "property",
       "The FBG objects of App. E.5.4 (F, K = 1/T_τ, g_Base = g_agg(·, C^(l), T_τ), g_Fiber = clip(·, ±ε/T_τ), R) "
       "reproduce the clipping term Eq. 79 as G(σ)_i at i = (s, a, τ, t; l_{s,a}) and the FiberPO gated ratio Eq. 80 as R∘G∘F.")
def check_eq_e5_fbg(
    profile: Profile,
    *,
    operator=fgh.fgh_operator,
    decompose=fgh.decompose,
    recover=fgh.recover,
    closed_form=fiberpo_gated_ratio,
) -> Outcome:
    tally = {"eq80": 0.0, "eq79": 0.0}
    strategy = fst.flat_batches(max_tokens=30)
    result = _search(profile, strategy, _e54_property(operator, decompose, recover, closed_form, tally), salt=651)
    searched = (
        f"{result.examples} flat batches with budgets aimed at every g_agg regime; largest relative gap of R∘G∘F to "
        f"Eq. 80 {tally['eq80']:.2g}, of T_τ·l_i·G(σ)_(i,l_i) to Eq. 79 {tally['eq79']:.2g}"
    )
    if result.falsified:
        return from_search(result, searched, recheck=_recheck_eq80)
    # the verification line read literally (no factor T_τ), searched separately so its witness is shrunk
    literal = _search(profile, strategy, _e54_property(operator, decompose, recover, closed_form, tally, literal=True), salt=652)
    if literal.falsified:
        return from_search(
            literal,
            "R∘G∘F reproduces Eq. 80 exactly and Eq. 79 is l_i T_τ G(σ)_(i,l_i); the 'Verification' line of App. E.5.4 "
            "equates clip(l log r − log s^(l), ±ε) + g_agg(log s^(l), C^(l), T_τ) (= l_i × Eq. 79) with G(σ)_i itself, "
            f"which is off by the factor T_τ wherever T_τ > 1 and the term is non-zero. {searched}",
            recheck=_ratio_g_to_eq79,
            examples=result.examples + literal.examples,
            condition="read the E.5.4 verification line as T_τ · l_i · G(σ)_(i,l_i) = Eq. 79 (G's fiber gate is clip(·, ±ε/T_τ) and K = 1/T_τ)",
            regimes=result.regimes,
        )
    return from_search(result, searched)


def _recheck_eq80(witness) -> dict:
    """Eq. 80 recomputed by the plain-Python FiberPO chain from the witness's numbers."""
    w = witness
    return {"python_reference_eq80": python_fiberpo_chain(w["log_ratio"], [w["traj_id"]], w["eps"], (w["c_pos"],), (w["c_neg"],))}


def _ratio_g_to_eq79(witness) -> dict:
    """G's own-channel entry over l_i × Eq. 79, token by token (T_τ where the literal reading is off)."""
    return {"ratio_G_to_eq79": [g / e if e else None for g, e in zip(witness["G_own_channel"], witness["l_times_eq79"])]}
