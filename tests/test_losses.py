"""Padded ⇄ flat layout, the verl-style loss registry and diagnostics (the bench command: tests/test_bench.py)."""

import contextlib
import functools

import pytest
import torch

from fiberpo_theory.core import diagnostics, objectives as obj
from fiberpo_theory.core.layout import flatten_mask, to_flat, to_padded
from fiberpo_theory.core.losses import POLICY_LOSSES, get_policy_loss_fn

from _loops import needs_loops

B, L = 5, 7


@pytest.fixture
def padded_batch(padded_batch_of):
    """5 rows of 7: one of 3 response tokens, one of 1 (a length-1 trajectory), one of 5."""
    return functools.partial(padded_batch_of, B, L, lengths={0: 3, 2: 1, 4: 5})


EXTRA = {
    "apc_obj": lambda device: dict(delta=0.1, state_ids=torch.arange(B * L, device=device).view(B, L) % 6),
    "fiberpo_domain": lambda device: dict(
        group_ids=torch.tensor([4, 4, 9, 9, 9], device=device), domain_ids=torch.tensor([1, 1, 1, 1, 1], device=device)
    ),
}


def flat_reference(name, old, new, adv, mask, extra):
    """The same loss assembled by hand from the flat objectives (rows = trajectories)."""
    batch = flatten_mask(mask)
    x, a, traj = (new - old)[batch.mask], adv[batch.mask], batch.traj_id
    gates = {
        "ppo": lambda: obj.ppo_gated_ratio(torch.exp(x), eps=0.2, advantages=a),
        "grpo": lambda: obj.grpo_gated_ratio(torch.exp(x), eps=0.2, advantages=a),
        "gspo": lambda: obj.gspo_gated_ratio(x, traj, eps=4e-4, advantages=a),
        "apc_obj": lambda: obj.apc_obj_gated_ratio(torch.exp(x), to_flat(extra["state_ids"], batch), delta=0.1),
        "fiberpo": lambda: obj.fiberpo_gated_ratio(x, traj, eps=0.04, c_pos=0.12, c_neg=0.05),
        "fiberpo_domain": lambda: obj.fiberpo_domain_gated_ratio(
            x, traj, to_flat(extra["group_ids"], batch), to_flat(extra["domain_ids"], batch),
            eps=0.04, c_pos=0.12, c_neg=0.05,
        ),
    }
    gated = gates[name]()
    return -obj.rgf_objective(gated, a, obj.aggregation_weights(name, x, traj))


def test_registry_has_every_method():
    assert set(POLICY_LOSSES) == {"ppo", "grpo", "gspo", "apc_obj", "fiberpo", "fiberpo_domain"}
    with pytest.raises(ValueError, match="unknown policy loss"):
        get_policy_loss_fn("trpo")


@pytest.mark.parametrize("name", sorted(["ppo", "grpo", "gspo", "apc_obj", "fiberpo", "fiberpo_domain"]))
def test_padded_loss_equals_flat_objective_and_backpropagates(name, device, dtype, padded_batch):
    old, new, adv, mask = padded_batch(dtype=dtype, device=device)
    extra = EXTRA.get(name, lambda d: {})(device)
    new = new.clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES[name](old, new, adv, mask, None, **extra)
    want = flat_reference(name, old, new.detach(), adv, mask, extra)
    assert torch.allclose(loss.detach(), want, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, new)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[mask == 0] == 0), "padding must receive no gradient"
    assert all(isinstance(v, float) for v in metrics.values())


def test_loss_agg_modes(padded_batch):
    old, new, adv, mask = padded_batch()
    fn = POLICY_LOSSES["grpo"]
    token, _ = fn(old, new, adv, mask, "token-mean")
    seq, _ = fn(old, new, adv, mask, "seq-mean-token-mean")
    default, _ = fn(old, new, adv, mask, None)
    summed, _ = fn(old, new, adv, mask, "seq-mean-token-sum")
    assert torch.equal(seq, default) and not torch.allclose(token, seq)
    batch = flatten_mask(mask)
    gated = obj.grpo_gated_ratio(torch.exp((new - old)[batch.mask]), eps=0.2, advantages=adv[batch.mask])
    assert torch.allclose(summed, -(gated * adv[batch.mask]).sum() / B)
    for name in POLICY_LOSSES:  # every loss names an unknown mode
        extra = EXTRA.get(name, lambda d: {})("cpu")
        with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
            POLICY_LOSSES[name](old, new, adv, mask, "token-sum-norm", **extra)


def test_padded_flat_round_trip(padded_batch):
    _, new, _, mask = padded_batch()
    batch = flatten_mask(mask)
    flat = to_flat(new, batch)
    assert flat.numel() == int(mask.sum())
    back = to_padded(flat, batch)
    assert torch.equal(back[mask.bool()], new[mask.bool()]) and torch.all(back[~mask.bool()] == 0)
    assert torch.equal(batch.traj_id, torch.tensor([0] * 3 + [1] * 7 + [2] + [3] * 7 + [4] * 5))


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda m: m.__setitem__((1, slice(None)), 0), "empty trajectory"),
        (lambda m: m.__setitem__((1, 1), 0.5), "only 0 and 1"),
    ],
)
def test_bad_mask(change, name, padded_batch):
    old, new, adv, mask = padded_batch()
    change(mask)
    with pytest.raises(ValueError, match=name):
        POLICY_LOSSES["fiberpo"](old, new, adv, mask)


def test_bad_loss_inputs_name_the_argument(padded_batch):
    old, new, adv, mask = padded_batch()
    with pytest.raises(ValueError, match="advantages"):
        POLICY_LOSSES["ppo"](old, new, adv[:, :3], mask)
    with pytest.raises(ValueError, match="group_ids"):
        POLICY_LOSSES["fiberpo_domain"](old, new, adv, mask, group_ids=torch.zeros(B), domain_ids=torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="delta"):
        POLICY_LOSSES["apc_obj"](old, new, adv, mask, state_ids=torch.zeros(B, L, dtype=torch.long))


@pytest.mark.parametrize("name", ["fiberpo", "fiberpo_domain"])
def test_fiberpo_losses_match_the_autograd_reference_in_loss_gradient_and_metrics(name, padded_batch):
    # the loss runs the fused gate; its value, gradient and metrics must be those of the autograd reference
    old, new, adv, mask = padded_batch(seed=3)
    new = new.clone().requires_grad_(True)
    extra = EXTRA.get(name, lambda d: {})("cpu")
    hyper = dict(eps=0.04, c_pos=0.12, c_neg=0.05)
    loss, metrics = POLICY_LOSSES[name](old, new, adv, mask, None, **hyper, **extra)
    batch = flatten_mask(mask)
    x, a, traj = (new - old)[batch.mask], adv[batch.mask], batch.traj_id
    if name == "fiberpo":
        parts = obj.fiberpo_parts(x, traj, **hyper)
    else:
        ids = (to_flat(extra["group_ids"], batch), to_flat(extra["domain_ids"], batch))
        parts = obj.fiberpo_domain_parts(x, traj, *ids, **hyper)
    want = -obj.rgf_objective(parts.gated_ratio, a, obj.aggregation_weights(name, x, traj))
    got_grad, want_grad = (torch.autograd.grad(v, new)[0] for v in (loss, want))
    assert torch.allclose(loss, want, rtol=0, atol=1e-12)
    assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-10) and got_grad.abs().max() > 0
    detached = parts._replace(**{f: getattr(parts, f).detach() for f in parts._fields if f != "traj"})
    want_metrics = diagnostics.fiberpo_metrics(detached, **hyper)
    assert metrics.keys() == {**want_metrics, "ratio/mean": 0}.keys()
    assert all(metrics[k] == pytest.approx(v, rel=1e-12, abs=1e-15) for k, v in want_metrics.items())


def test_non_finite_padding_is_ignored(padded_batch):
    old, new, adv, mask = padded_batch()
    for tensor in (old, new, adv):
        tensor[0, 5] = float("nan")  # mask[0, 3:] is padding
    loss, _ = POLICY_LOSSES["fiberpo"](old, new, adv, mask)
    assert torch.isfinite(loss)


# --- diagnostics ----------------------------------------------------------------------------


def test_regime_labels_by_hand():
    # trajectory 0: log s+ = 0.15 with C+ = 0.12, k = T = 2 → rollback; log s− = 0.05 ≤ 0.2 → pass (G-II,r)
    # trajectory 1 (T = 1): x = 0.01 → both pass (G-I), |u| = 0 < ε → L-I
    # trajectory 2 (T = 1): x = 0.5 → + channel zeroed (0.5 ≥ 2·0.12), − passes → G-II
    x = torch.tensor([0.3, -0.1, 0.01, 0.5], dtype=torch.float64)
    traj = torch.tensor([0, 0, 1, 2])
    hyper = dict(eps=0.1, c_pos=0.12, c_neg=0.2)
    parts = obj.fiberpo_parts(x, traj, **hyper)
    pos, neg = diagnostics.channel_regimes(parts, c_pos=0.12, c_neg=0.2)
    assert pos.tolist() == [1, 0, 2] and neg.tolist() == [0, 0, 0]
    labels = diagnostics.global_regime(pos, neg)
    assert [diagnostics.GLOBAL_REGIMES[i] for i in labels] == ["G-II,r", "G-I", "G-II"]
    # trajectory 0: u = (0.15, −0.05) → one of two clipped: L-II
    assert diagnostics.local_regime(parts, eps=0.1).tolist() == [1, 0, 0]
    metrics = diagnostics.fiberpo_metrics(parts, **hyper)
    assert metrics["global/G-I"] == pytest.approx(1 / 3)
    assert metrics["clipfrac/numerator"] == pytest.approx(1 / 4)


def test_global_regime_covers_all_nine_channel_pairs():
    pos = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    neg = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    names = [diagnostics.GLOBAL_REGIMES[i] for i in diagnostics.global_regime(pos, neg)]
    assert names == ["G-I", "G-II,r", "G-II", "G-II,r", "G-III,r", "G-III,r", "G-II", "G-III,r", "G-III"]


# --- messages and padding (bad input in a padded batch) ---------------------------------------


def _two_by_four():
    return torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4)


EXTRA_24 = {
    "apc_obj": dict(delta=0.1, state_ids=torch.zeros(2, 4, dtype=torch.long)),
    "fiberpo_domain": dict(group_ids=torch.tensor([0, 0]), domain_ids=torch.tensor([0, 0])),
}


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("arg", ["old_log_prob", "log_prob", "advantages"])
def test_non_finite_token_is_reported_by_row_and_column(name, arg):
    inputs = dict(zip(["old_log_prob", "log_prob", "advantages", "response_mask"], _two_by_four()))
    inputs[arg][1, 2] = float("nan")
    with pytest.raises(ValueError) as error:
        POLICY_LOSSES[name](**inputs, **EXTRA_24.get(name, {}))
    message = str(error.value)
    assert message.startswith(f"{arg} ") and "row 1, column 2" in message
    assert "ratio" not in message


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", ["fiberpo", "fiberpo_domain"])
@pytest.mark.parametrize("arg", ["old_log_prob", "log_prob", "advantages"])
def test_fiberpo_losses_name_any_non_finite_token_their_objective_meets(name, arg, value, padded_batch):
    """The FiberPO losses skip the finiteness passes and read J's instead: every non-finite x_i or Â_i must
    still make J non-finite, so that the input is named by row and column, whatever the path."""
    old, new, adv, mask = padded_batch(seed=3)
    extra = EXTRA.get(name, lambda d: {})("cpu")
    inputs = dict(old_log_prob=old.clone(), log_prob=new.clone(), advantages=adv.clone())
    row, col = 2, int(mask[2].nonzero()[-1])  # the last response token of a row
    inputs[arg][row, col] = value
    with pytest.raises(ValueError, match=rf"^{arg} has a non-finite value at row {row}, column {col}"):
        POLICY_LOSSES[name](**inputs, response_mask=mask, **extra)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("arg", ["old_log_prob", "log_prob", "advantages"])
def test_padded_slots_are_ignored_for_every_input(name, arg, padded_batch):
    old, new, adv, mask = padded_batch()
    extra = EXTRA.get(name, lambda d: {})("cpu")
    clean, _ = POLICY_LOSSES[name](old, new, adv, mask, None, **extra)
    inputs = dict(old_log_prob=old.clone(), log_prob=new.clone(), advantages=adv.clone())
    inputs[arg][mask == 0] = float("nan")
    dirty, _ = POLICY_LOSSES[name](**inputs, response_mask=mask, loss_agg_mode=None, **extra)
    assert torch.equal(clean, dirty)


@needs_loops
@pytest.mark.parametrize("name", ["fiberpo", "fiberpo_domain"])
def test_fiberpo_losses_count_their_metrics_in_the_losss_own_pass(name, padded_batch, monkeypatch):
    old, new, adv, mask = padded_batch(seed=6)
    rows = dict(group_ids=torch.tensor([0, 0, 1, 1, 2]), domain_ids=torch.tensor([0, 0, 1, 1, 1]))
    extra = rows if name == "fiberpo_domain" else {}
    hyper = dict(eps=0.04, c_pos=0.12, c_neg=0.05, **extra)
    with monkeypatch.context() as patch:  # the reference: metrics counted by their own pass, the loss without counts
        patch.setattr(diagnostics, "counting_gate", lambda enabled=True: contextlib.nullcontext())
        _, want = POLICY_LOSSES[name](old, new, adv, mask, None, **hyper)
    monkeypatch.setattr(diagnostics, "_runs_counts", lambda *a: pytest.fail("the metrics were counted again"))
    _, got = POLICY_LOSSES[name](old, new, adv, mask, None, **hyper)
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-12, abs=1e-15)


@needs_loops
@pytest.mark.parametrize("mode", [None, "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_fiberpo_loss_takes_eq2_in_the_gates_pass_where_mu_is_constant_per_row(mode, padded_batch):
    # every mode's μ is constant on each row: seq-mean-token-sum's 1/B as the token μ scaled by N/B
    old, new, adv, mask = padded_batch(seed=5)
    leaf = new.clone().requires_grad_(True)
    hyper = dict(eps=0.04, c_pos=0.12, c_neg=0.05)
    loss, _ = POLICY_LOSSES["fiberpo"](old, leaf, adv, mask, mode, **hyper)
    nodes, stack = set(), [loss.grad_fn]
    while stack:  # every node of the loss's graph
        node = stack.pop()
        nodes.add(type(node).__name__)
        stack += [f for f, _ in node.next_functions if f is not None]
    assert "FiberObjectiveBackward" in nodes and "FiberGateBackward" not in nodes, nodes
    batch = flatten_mask(mask)
    x, a = (leaf - old)[batch.mask], adv[batch.mask]
    gated = obj.fiberpo_gated_ratio(x, batch.traj_id, **hyper)
    weights = (torch.full_like(gated, 1.0 / mask.shape[0]) if mode == "seq-mean-token-sum"
               else obj.aggregation_weights("token" if mode == "token-mean" else "trajectory", gated, batch.traj_id))
    want = -obj.rgf_objective(gated, a, weights)
    got_grad, want_grad = (torch.autograd.grad(v, leaf)[0] for v in (loss, want))
    assert torch.allclose(loss, want, rtol=0, atol=1e-12)
    assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-10) and got_grad.abs().max() > 0
