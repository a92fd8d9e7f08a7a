"""audit-loss on every loss verl ships, on planted defects, and the committed docs/verl-losses.md."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, compute_policy_loss_vanilla  # noqa: E402

from fiberpo_theory.tools.audit_loss import (  # noqa: E402
    AGG_MODES,
    LOSS_PROPERTY_IDS,
    audit_loss,
    audit_verl_registry,
    parse_markdown_verdicts,
)
from fiberpo_theory.tools.cli import main  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "verl-losses.md"
VERDICTS = {"holds", "fails", "error"}


@pytest.fixture(scope="module")
def registry_reports():
    return audit_verl_registry()


def surrogate_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """The plain policy-gradient surrogate -agg(ρ A r), aggregated by verl's own agg_loss; padded slots zeroed first."""
    keep = response_mask.bool()
    ratio = torch.exp(torch.where(keep, log_prob - old_log_prob, 0.0))
    if rollout_is_weights is not None:
        ratio = ratio * torch.where(keep, rollout_is_weights, 0.0)
    return agg_loss(loss_mat=-torch.where(keep, advantages, 0.0) * ratio, loss_mask=response_mask, loss_agg_mode=loss_agg_mode), {}


def drops_the_weights(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: the plain surrogate that never reads rollout_is_weights."""
    return surrogate_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode)


def row_mean_weights(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Sequence-level weighting: every token of a row carries the row's mean ρ (right only for row-constant ρ)."""
    if rollout_is_weights is None:
        return surrogate_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode)
    keep = response_mask.bool()
    rho = torch.where(keep, rollout_is_weights, 0.0)
    row = (rho.sum(1, keepdim=True) / keep.sum(1, keepdim=True)).expand_as(rho)
    return surrogate_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, rollout_is_weights=row)


def naive_surrogate(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """The same surrogate without zeroing padded slots: verl's agg_loss alone decides what NaN padding does."""
    ratio = torch.exp(log_prob - old_log_prob)
    return agg_loss(loss_mat=-advantages * ratio, loss_mask=response_mask, loss_agg_mode=loss_agg_mode), {}


def unmasked_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: a token-mean whose sum forgets the mask (only the denominator counts response tokens)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return (-advantages * ratio).sum() / response_mask.sum(), {}


def detached_at_r1(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: tokens in even columns that sit exactly at r = 1 lose their gradient (values unchanged)."""
    ratio = torch.exp(log_prob - old_log_prob)
    even = (torch.arange(ratio.shape[1]) % 2 == 0).expand_as(ratio)
    ratio = torch.where(even & (log_prob == old_log_prob), ratio.detach(), ratio)
    return agg_loss(loss_mat=-advantages * ratio, loss_mask=response_mask, loss_agg_mode=loss_agg_mode), {}


def batch_normalised(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: advantages re-centred over the whole batch inside the loss, which couples rows."""
    keep = response_mask.bool()
    centred = advantages - advantages[keep].mean()
    return surrogate_loss(old_log_prob, log_prob, centred, response_mask, loss_agg_mode)


def overflowing(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: exact on-policy, but exp(20 log r) overflows to inf (and 0 * inf = NaN) far off-policy."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio) + 0 * torch.exp(20 * log_ratio)
    return agg_loss(loss_mat=-advantages * ratio, loss_mask=response_mask, loss_agg_mode=loss_agg_mode), {}


def needs_a_key(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    raise KeyError("policy_loss.my_beta is not set")


def test_every_registry_loss_gets_a_verdict_per_property(registry_reports):
    shipped = [name for name, fn in POLICY_LOSS_REGISTRY.items() if fn.__module__.startswith("verl.")]
    assert len(shipped) >= 12 and list(registry_reports) == shipped  # none skipped
    for name, report in registry_reports.items():
        assert [p.id for p in report.properties] == list(LOSS_PROPERTY_IDS), name
        for p in report.properties:
            assert p.verdict in VERDICTS
            if p.verdict != "holds":
                assert p.witness, (name, p)  # a failure or an error always says where or why
            if p.verdict == "error":
                assert p.witness["error"].strip()


def test_verl_ppo_is_the_plain_surrogate_to_first_order(registry_reports):
    """verl's vanilla PPO clip (dual clip, asymmetric range) agrees with -agg(A r) at r = 1 by construction.

    Its one failure is NaN padding in the seq-mean modes, where verl's agg_loss sums loss_mat * loss_mask
    (NaN * 0 = NaN) instead of masking as it does for token-mean and token-sum.
    """
    report = registry_reports["vanilla"]
    assert [p.id for p in report.failures] == ["nan-padding-ignored"], report
    assert report["nan-padding-ignored"].witness["failing_modes"] == ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def test_the_recovered_gating_of_vanilla_is_ppo_clip(registry_reports):
    """G read off dloss/dA equals min(r, clip(r)) for A > 0 and the dual-clipped max for A < 0 (verl defaults)."""
    table = registry_reports["vanilla"]["implied-gating"].witness["gating"]
    r = torch.exp(torch.tensor(table["log_ratio"], dtype=torch.float64))
    positive = torch.minimum(r, r.clamp(0.8, 1.2))
    negative = torch.maximum(r, r.clamp(0.8, 1.2)).clamp(max=3.0)
    assert torch.allclose(torch.tensor(table["A>0"], dtype=torch.float64), positive, atol=1e-12)
    assert torch.allclose(torch.tensor(table["A<0"], dtype=torch.float64), negative, atol=1e-12)


def test_a_loss_that_needs_a_config_key_is_an_error_with_the_reason():
    report = audit_loss(needs_a_key, max_examples=3)
    assert [p.verdict for p in report.properties] == ["error"] * len(LOSS_PROPERTY_IDS)
    assert "my_beta" in report["on-policy-value"].witness["error"]
    assert not report.passed and "[ERROR]" in str(report)


def test_the_plain_surrogate_passes():
    report = audit_loss(surrogate_loss, max_examples=6)
    assert report.passed, report


def test_a_loss_that_drops_rollout_is_weights_fails_importance_weights_only():
    report = audit_loss(drops_the_weights, max_examples=6)
    assert [p.id for p in report.failures] == ["importance-weights"], report
    witness = report["importance-weights"].witness
    assert witness["weights"] in ("per-token", "row-constant") and witness["rho"] != 1.0
    assert witness["failing_modes"] == {"per-token": list(AGG_MODES), "row-constant": list(AGG_MODES)}


def test_sequence_level_weights_hold_for_row_constant_weights_only():
    result = audit_loss(row_mean_weights, max_examples=6)["importance-weights"]
    assert result.verdict == "fails" and result.witness["weights"] == "per-token"
    assert list(result.witness["failing_modes"]) == ["per-token"]  # row-constant ρ: the row mean is ρ itself


def test_verl_geo_mean_weights_whole_sequences_and_bypass_mode_ignores_the_weights(registry_reports):
    geo = registry_reports["geo_mean"]["importance-weights"]
    assert geo.verdict == "fails" and list(geo.witness["failing_modes"]) == ["per-token"]  # a row's geometric mean of ρ
    bypass = registry_reports["bypass_mode"]["importance-weights"]
    assert bypass.verdict == "fails" and list(bypass.witness["failing_modes"]) == ["per-token", "row-constant"]
    assert registry_reports["vanilla"]["importance-weights"].passed and registry_reports["gspo"]["importance-weights"].passed


def test_the_packages_verl_losses_apply_rollout_is_weights_per_token():
    from fiberpo_theory.integrations import verl as ours

    config = {"clip_ratio": 0.2, "policy_loss": {"fiberpo_eps": 0.04, "fiberpo_c_pos": 0.12, "fiberpo_c_neg": 0.05}}
    for fn in (ours.fiberpo, ours.rgf_vanilla):
        result = audit_loss(fn, config=config, max_examples=4)["importance-weights"]
        assert result.verdict == "holds", (fn.__name__, result)


def test_detaching_tokens_at_r1_fails_on_policy_gradient_with_the_token():
    report = audit_loss(detached_at_r1, max_examples=6)
    assert report["on-policy-value"].passed  # the values are untouched
    result = report["on-policy-gradient"]
    assert result.verdict == "fails"
    assert result.witness["dloss/dlog_prob"] == 0.0 and result.witness["expected"] != 0.0
    assert result.witness["position"][1] % 2 == 0 and not result.witness["padded"]


def test_batch_wide_advantage_centring_fails_row_block():
    report = audit_loss(batch_normalised, max_examples=6)
    result = report["row-block"]
    assert result.verdict == "fails"
    assert result.witness["moved"].endswith("[0]") and result.witness["position"][0] >= 1  # row 0 moved, another row changed


def test_overflow_far_off_policy_fails_finite_extremes_only_there():
    report = audit_loss(overflowing, max_examples=6)
    assert report["on-policy-gradient"].passed
    assert report["finite-extremes"].verdict == "fails"
    assert "50" in report["finite-extremes"].witness["case"] or "20" in report["finite-extremes"].witness["case"]


def test_the_default_config_runs_verl_vanilla_directly():
    """The config the audit builds is one verl's own loss accepts: on-policy token-mean loss is -mean(A)."""
    from fiberpo_theory.tools.audit_loss import default_verl_config

    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    adv = torch.tensor([[0.5, -1.5, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, _ = compute_policy_loss_vanilla(old_log_prob=old, log_prob=old.clone(), advantages=adv, response_mask=mask,
                                          loss_agg_mode="token-mean", config=default_verl_config())
    assert float(loss) == pytest.approx(-(0.5 - 1.5) / 2, abs=1e-12)


@pytest.mark.parametrize("name, value", [("seed", -1), ("max_examples", 0), ("loss_agg_modes", ("nope",)), ("loss_agg_modes", ())])
def test_bad_arguments_name_themselves(name, value):
    with pytest.raises(ValueError, match=name):
        audit_loss(surrogate_loss, **{name: value})


def test_fn_must_be_callable():
    with pytest.raises(ValueError, match="fn"):
        audit_loss("not a function")


def test_committed_doc_matches_a_fresh_run(registry_reports):
    committed = parse_markdown_verdicts(DOC.read_text())
    fresh = {name: {p.id: p.verdict for p in report.properties} for name, report in registry_reports.items()}
    assert committed == fresh, "docs/verl-losses.md is stale: run fiberpo-theory audit-loss --verl-registry --markdown docs/verl-losses.md"
    import verl

    assert f"verl {verl.__version__}" in DOC.read_text()


def test_cli_exit_codes_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the planted losses above, as MODULE:FUNCTION
    out = tmp_path / "report.json"
    assert main(["audit-loss", "test_audit_loss:surrogate_loss", "--max-examples", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"function", "reference", "seed", "passed", "properties"} <= set(data)
    assert [p["id"] for p in data["properties"]] == list(LOSS_PROPERTY_IDS)
    assert main(["audit-loss", "test_audit_loss:detached_at_r1", "--max-examples", "3", "--mode", "token-mean"]) == 1
    assert "FAILS] on-policy-gradient" in capsys.readouterr().out
    assert main(["audit-loss", "test_audit_loss:missing"]) == 2
    assert main(["audit-loss"]) == 2
    assert main(["audit-loss", "test_audit_loss:surrogate_loss", "--verl-registry"]) == 2
    assert main(["audit-loss", "test_audit_loss:surrogate_loss", "--markdown", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line]) == 4


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--max-examples", "0"], ["--mode", "nope"]])
def test_cli_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["audit-loss", "test_audit_loss:surrogate_loss", *argv])
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_doc_generator_writes_what_the_parser_reads(registry_reports, tmp_path):
    from fiberpo_theory.tools.audit_loss import registry_markdown

    text = registry_markdown(registry_reports, command="x")
    assert parse_markdown_verdicts(text) == {n: {p.id: p.verdict for p in r.properties} for n, r in registry_reports.items()}
    assert "SPEC" not in text


def test_config_overrides_let_dro_run_and_its_penalty_shows_in_implied_gating():
    from fiberpo_theory.tools.audit_loss import verl_config

    report = audit_loss(POLICY_LOSS_REGISTRY["dro"], config=verl_config(["policy_loss.dro_beta=0.1"]), max_examples=3)
    assert "error" not in {p.verdict for p in report.properties}
    # the quadratic log-ratio penalty does not scale with A, so the loss is not -agg(A G) off-policy
    assert report["implied-gating"].verdict == "fails"


@pytest.mark.parametrize("override, named", [("policy_loss.nope=1", "nope"), ("no_equals_sign", "KEY=VALUE"), ("clip_ratio_x=0.1", "clip_ratio_x")])
def test_bad_config_overrides_exit_2_naming_the_key(override, named, capsys):
    assert main(["audit-loss", "--verl-registry", "--set", override]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


def ignores_the_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: always aggregates by token-mean, whatever loss_agg_mode the trainer asks for."""
    return surrogate_loss(old_log_prob, log_prob, advantages, response_mask, "token-mean")


def test_a_loss_that_ignores_loss_agg_mode_fails_in_the_other_modes_only():
    result = audit_loss(ignores_the_mode, max_examples=6)["on-policy-gradient"]
    assert result.verdict == "fails"
    for kind, modes in result.witness["failing_modes"].items():
        assert "token-mean" not in modes and modes, kind


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_loss_fails_every_property_with_a_witness(bad):
    def non_finite(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
        ratio = torch.exp(log_prob - old_log_prob) * bad  # still differentiable: NaN/inf gradients too
        return agg_loss(loss_mat=-advantages * ratio, loss_mask=response_mask, loss_agg_mode=loss_agg_mode), {}

    report = audit_loss(non_finite, max_examples=3)
    for p in report.properties:
        assert p.verdict == "fails" and p.witness, p
    assert "coupled" not in report["row-block"].details  # a non-finite gradient is not reported as coupling
    data = json.loads(json.dumps(report.to_json()), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["passed"] is False


def shifted_gate_from_row_0(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Planted defect: every row's gated ratio gets an additive term from row 0's log-ratio.

    The term does not depend on the row's own log_prob, so dloss/dlog_prob of the other rows never moves;
    only their dloss/dA (the implied gated ratio) does.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    offset = 0.1 * (log_prob - old_log_prob)[0].sum()
    gated = torch.cat([ratio[:1], ratio[1:] + offset])
    return agg_loss(loss_mat=-advantages * gated, loss_mask=response_mask, loss_agg_mode=loss_agg_mode), {}


def test_coupling_through_the_gated_ratio_alone_fails_row_block():
    result = audit_loss(shifted_gate_from_row_0, max_examples=6)["row-block"]
    assert result.verdict == "fails"
    assert result.witness["gradient"] == "dloss/dadvantages" and result.witness["position"][0] >= 1


def runs_only_token_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    if loss_agg_mode != "token-mean":
        raise NotImplementedError(f"{loss_agg_mode} is not supported")
    return surrogate_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, rollout_is_weights=rollout_is_weights)


def test_a_loss_that_supports_some_modes_is_an_error_naming_them_and_passes_on_those():
    report = audit_loss(runs_only_token_mean, max_examples=3)
    reason = report["on-policy-value"].witness["error"]
    assert {p.verdict for p in report.properties} == {"error"}
    assert "ordinary batch in token-sum, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm;" in reason and "--mode" in reason
    assert audit_loss(runs_only_token_mean, max_examples=3, loss_agg_modes=("token-mean",)).passed


def test_padded_slots_that_enter_the_loss_fail_padding_ignored():
    report = audit_loss(unmasked_mean, max_examples=4, loss_agg_modes=("token-mean",))
    assert report["on-policy-value"].verdict == "fails"  # on-policy padding (r = 1, random A) already counts
    result = report["padding-ignored"]
    assert result.verdict == "fails" and result.witness["changed"] in ("loss", "dloss/dlog_prob")


def test_nan_padding_left_to_verls_agg_loss_fails_where_it_multiplies_by_the_mask():
    """agg_loss masks by torch.where in token-mean/token-sum (value stays finite) but the gradient through -A * r
    at a NaN slot is 0 * NaN; the zeroed surrogate passes both padding properties."""
    naive = audit_loss(naive_surrogate, max_examples=4)
    assert naive["padding-ignored"].passed and naive["nan-padding-ignored"].verdict == "fails"
    assert naive["nan-padding-ignored"].witness["failing_modes"]
    clean = audit_loss(surrogate_loss, max_examples=4)
    assert clean["nan-padding-ignored"].passed, clean["nan-padding-ignored"]


def test_losses_other_packages_register_stay_out_of_the_verl_document(monkeypatch):
    """Importing fiberpo_theory.integrations.verl registers FiberPO into verl's registry; the doc is about verl."""
    from fiberpo_theory.tools.audit_loss import verl_registry

    monkeypatch.setitem(POLICY_LOSS_REGISTRY, "third_party", surrogate_loss)
    names = list(verl_registry())
    assert "third_party" not in names and "vanilla" in names
