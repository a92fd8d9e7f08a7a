"""The verl adapter, called through verl's own registry, against verl's losses and this package's objectives."""

import os
import re
import subprocess
import sys

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
actor_config = pytest.importorskip("verl.workers.config.actor")

from fiberpo_theory.core import objectives as obj  # noqa: E402
from fiberpo_theory.integrations import verl as fv  # noqa: E402
from fiberpo_theory.core.losses import POLICY_LOSSES  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
B, L = 6, 7
FIBERPO_KEYS = dict(fiberpo_eps=0.04, fiberpo_c_pos=0.12, fiberpo_c_neg=0.05)
FIBERPO_KEYS_AS_KWARGS = dict(eps=0.04, c_pos=0.12, c_neg=0.05)


@pytest.fixture(autouse=True)
def no_registered_hyper(monkeypatch):
    """register(...) elsewhere (e.g. the guide) must not fill in the keys these tests leave out."""
    monkeypatch.setattr(fv, "_registered_hyper", {})


def config(rollout_n=2, policy_keys=FIBERPO_KEYS, **overrides):
    c = actor_config.ActorConfig(strategy="fsdp", rollout_n=rollout_n, ppo_micro_batch_size_per_gpu=2, **overrides)
    for key, value in policy_keys.items():
        setattr(c.policy_loss, key, value)
    return c


@pytest.fixture
def batch(padded_batch_of):
    """6 rows of 7 (one of 3 response tokens, one of 5), junk in the padding; ``empty_row``: row 3 has none."""
    def make(seed=0, empty_row=False):
        lengths = {0: 3, 4: 5, **({3: 0} if empty_row else {})}
        return padded_batch_of(B, L, lengths=lengths, seed=seed, junk_padding=True)
    return make


def loss_and_grad(fn, old, new, adv, mask, **kwargs):
    new = new.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, new)
    return loss.detach(), grad, metrics


def test_register_puts_every_loss_into_verls_registry():
    fv.register()
    for name, fn in fv.LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ours,theirs", [("rgf_vanilla", "vanilla"), ("rgf_gspo", "gspo")])
@pytest.mark.parametrize("overrides", [{}, dict(clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.0,
                                                 global_batch_info=dict(dp_size=2, global_batch_size=9,
                                                                        batch_num_tokens=50))])
def test_baselines_equal_verls_own_losses(mode, ours, theirs, overrides, batch):
    c = config(**overrides)
    old, new, adv, mask = batch(seed=3, empty_row=True)
    new = new.clone()
    new[1, 0] = old[1, 0] + 2.0  # ratio e² above the dual clip 2.0
    adv[1, 0] = -1.0
    want, want_grad, want_metrics = loss_and_grad(core_algos.get_policy_loss_fn(theirs), old, new, adv, mask,
                                                  loss_agg_mode=mode, config=c)
    got, got_grad, metrics = loss_and_grad(core_algos.get_policy_loss_fn(ours), old, new, adv, mask,
                                           loss_agg_mode=mode, config=c)
    assert abs(float(got - want)) <= 1e-6
    assert float((got_grad - want_grad).abs().max()) <= 1e-6
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_rollout_is_weights_scale_the_token_loss(batch):
    c = config()
    old, new, adv, mask = batch()
    w = torch.rand(B, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for ours, theirs in [("rgf_vanilla", "vanilla"), ("rgf_gspo", "gspo")]:
        want, *_ = loss_and_grad(core_algos.get_policy_loss_fn(theirs), old, new, adv, mask, config=c,
                                 rollout_is_weights=w)
        got, *_ = loss_and_grad(core_algos.get_policy_loss_fn(ours), old, new, adv, mask, config=c,
                                rollout_is_weights=w)
        assert abs(float(got - want)) <= 1e-6


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["fiberpo", "fiberpo_domain", "apc_obj"])
def test_fiberpo_losses_equal_the_package_registry(mode, name, batch):
    c = config(policy_keys=dict(FIBERPO_KEYS, apc_delta=0.1))
    old, new, adv, mask = batch()
    uid = ["p0", "p0", "p1", "p1", "p2", "p2"]
    source = ["math", "math", "code", "code", "math", "math"]
    states = torch.arange(B * L).view(B, L) % 5
    extra = {"fiberpo_domain": dict(group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), domain_ids=torch.tensor([0, 0, 1, 1, 0, 0])),
             "apc_obj": dict(delta=0.1, state_ids=states)}.get(name, {})
    want, want_grad, _ = loss_and_grad(POLICY_LOSSES[name], old, new, adv, mask, loss_agg_mode=mode, **extra)
    with fv.batch_ids(uid=uid, data_source=source, state_ids=states):
        got, got_grad, metrics = loss_and_grad(core_algos.get_policy_loss_fn(name), old, new, adv, mask,
                                               loss_agg_mode=mode, config=c)
    assert abs(float(got - want)) <= 1e-10
    assert float((got_grad - want_grad).abs().max()) <= 1e-10
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)


def test_fiberpo_on_policy_is_the_policy_gradient(batch):
    """At r = 1 the gate is the identity, so the loss is -Σ μ Â and its gradient -μ Â (Eq. 2)."""
    c = config()
    old, _, adv, mask = batch()
    loss, grad, _ = loss_and_grad(fv.fiberpo, old, old, adv, mask, config=c)
    n = mask.sum()
    assert torch.allclose(loss, -(adv * mask).sum() / n)
    assert torch.allclose(grad, -adv * mask / n)


def test_empty_rows_follow_verl(batch):
    c = config()
    old, new, adv, mask = batch(empty_row=True)
    keep = mask.any(1)
    for mode in AGG_MODES:
        full, *_ = loss_and_grad(fv.fiberpo, old, new, adv, mask, loss_agg_mode=mode, config=c)
        dropped, *_ = loss_and_grad(fv.fiberpo, old[keep], new[keep], adv[keep], mask[keep], loss_agg_mode=mode, config=c)
        assert torch.allclose(full, dropped), mode  # verl leaves fully masked rows out of every mean


def test_missing_key_is_named(batch):
    c = config(policy_keys={})
    old, new, adv, mask = batch()
    with pytest.raises(ValueError, match="policy_loss.fiberpo_c_pos"):
        fv.fiberpo(old, new, adv, mask, config=config(policy_keys=dict(fiberpo_eps=0.04, fiberpo_c_neg=0.05)))
    with pytest.raises(ValueError, match="apc_delta"):
        fv.apc_obj(old, new, adv, mask, config=c, state_ids=torch.zeros(B, L, dtype=torch.long))
    with pytest.raises(ValueError, match="uid"):
        fv.fiberpo_domain(old, new, adv, mask, config=config())
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        fv.fiberpo(old, new, adv, mask, loss_agg_mode="token-median", config=config())


def test_split_prompt_group_is_refused(batch):
    old, new, adv, mask = batch()
    with fv.batch_ids(uid=["a", "a", "b", "b", "b", "c"], data_source=["d"] * B):
        with pytest.raises(ValueError, match=r"group uid 'b' has 3 responses .* expected 2"):
            fv.fiberpo_domain(old, new, adv, mask, config=config(rollout_n=2))


def test_loaded_through_verls_external_module_variable(tmp_path):
    """A user's settings module named in VERL_USE_EXTERNAL_MODULES registers the losses and FiberPO's keys in
    every process that imports verl; a loss then runs from a config that lacks the keys."""
    (tmp_path / "my_fiberpo_settings.py").write_text(
        "from fiberpo_theory.integrations import verl as fiberpo_verl\n"
        "fiberpo_verl.register(fiberpo_eps=0.04, fiberpo_c_pos=0.12, fiberpo_c_neg=0.05)\n"
    )
    code = (
        "import torch\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as r, get_policy_loss_fn\n"
        "from verl.workers.config.actor import ActorConfig\n"
        "from fiberpo_theory.core.losses import POLICY_LOSSES\n"
        "print(all(k in r for k in ['fiberpo', 'fiberpo_domain', 'apc_obj']))\n"
        "g = torch.Generator().manual_seed(0)\n"
        "old = torch.randn(3, 4, generator=g, dtype=torch.float64)\n"
        "new = old + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)\n"
        "adv, mask = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.ones(3, 4)\n"
        "c = ActorConfig(strategy='fsdp', rollout_n=1, ppo_micro_batch_size_per_gpu=1)\n"
        "got, _ = get_policy_loss_fn('fiberpo')(old_log_prob=old, log_prob=new, advantages=adv,"
        " response_mask=mask, loss_agg_mode='token-mean', config=c)\n"
        "want, _ = POLICY_LOSSES['fiberpo'](old, new, adv, mask, 'token-mean', eps=0.04, c_pos=0.12, c_neg=0.05)\n"
        "print(float((got - want).abs()))\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="my_fiberpo_settings", VERL_USE_EXTERNAL_PLUGINS="none",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    registered, difference = out.stdout.strip().splitlines()[-2:]
    assert registered == "True"
    assert float(difference) <= 1e-12


# --- verl's worker loss: ids from the micro-batch TensorDict ------------------------------------


def micro_batch(old, adv, mask, uid, data_source, prompt_len=2):
    """A padded micro-batch as verl's worker hands it to ppo_loss (non-tensor columns as NonTensorStack)."""
    from tensordict.tensorclass import NonTensorData, NonTensorStack
    from verl.utils import tensordict_utils as tu

    def column(values):
        return NonTensorStack.from_list([NonTensorData(v) for v in values])

    n = mask.shape[0]
    attention = torch.cat([torch.ones(n, prompt_len), mask], 1).long()
    return tu.get_tensordict(
        tensor_dict=dict(prompts=torch.zeros(n, prompt_len, dtype=torch.long),
                         responses=torch.zeros(mask.shape, dtype=torch.long), attention_mask=attention,
                         response_mask=mask, old_log_probs=old, advantages=adv,
                         uid=column(uid), data_source=column(data_source)),
        non_tensor_dict=dict(dp_size=1, batch_num_tokens=None, global_batch_size=None),
    )


def flat_log_probs(new, mask, prompt_len=2):
    """The model output verl's ppo_loss expects: one value per prompt and response token, rows concatenated,
    position t holding the log-prob of token t + 1 (so a response starts at prompt_len - 1)."""
    pad = torch.zeros(prompt_len - 1, dtype=new.dtype), torch.zeros(1, dtype=new.dtype)
    return torch.cat([torch.cat([pad[0], new[i, : int(mask[i].sum())], pad[1]]) for i in range(len(new))])


def domain_config(rollout_n=2):
    c = actor_config.ActorConfig(strategy="fsdp", rollout_n=rollout_n, ppo_micro_batch_size_per_gpu=2,
                                 policy_loss=actor_config.PolicyLossConfig(loss_mode="fiberpo_domain"))
    for key, value in FIBERPO_KEYS.items():
        setattr(c.policy_loss, key, value)
    return c


UID = ["p0", "p0", "p1", "p1", "p2", "p2"]
SOURCE = ["math", "math", "code", "code", "math", "math"]


def test_worker_loss_reads_uid_and_data_source_from_the_micro_batch(batch):
    """Through verl's own ppo_loss: the TensorDict's uid/data_source reach FiberPO-Domain (Eq. 30-33)."""
    pytest.importorskip("verl.workers.utils.losses")
    fv.register()
    old, new, adv, mask = batch()
    mask = mask.clone()
    mask[:, -1] = 0  # verl's response_mask is left-aligned: no holes inside a response
    log_probs = flat_log_probs(new, mask).requires_grad_(True)
    loss, metrics = fv.ppo_loss(domain_config(), dict(log_probs=log_probs), micro_batch(old, adv, mask, UID, SOURCE))
    (grad,) = torch.autograd.grad(loss, log_probs)

    new = new.clone().requires_grad_(True)
    want, _ = POLICY_LOSSES["fiberpo_domain"](old, new, adv, mask, "token-mean", **FIBERPO_KEYS_AS_KWARGS,
                                             group_ids=torch.tensor([0, 0, 1, 1, 2, 2]),
                                             domain_ids=torch.tensor([0, 0, 1, 1, 0, 0]))
    (want_grad,) = torch.autograd.grad(want, new)
    assert abs(float(loss.detach() - want.detach())) <= 1e-10
    assert torch.allclose(flat_log_probs(want_grad, mask), grad, atol=1e-12, rtol=0)
    assert "actor/pg_loss" in metrics and "actor/channel_pos/P" in metrics


def test_worker_loss_without_uid_column_names_it(batch):
    pytest.importorskip("verl.workers.utils.losses")
    fv.register()
    old, new, adv, mask = batch()
    td = micro_batch(old, adv, mask, UID, SOURCE).exclude("uid")
    with pytest.raises(ValueError, match="uid is required"):
        fv.ppo_loss(domain_config(), dict(log_probs=flat_log_probs(new, mask)), td)


@pytest.mark.parametrize("shuffle", [False, True])
def test_verls_batching_keeps_groups_whole_unless_rows_are_reordered(shuffle):
    """verl's mini-batch iterator and micro-batch chunking in row order keep rollout.n groups whole;
    shuffling rows splits them, and the loss then refuses the micro-batch naming the uid."""
    from verl.utils import tensordict_utils as tu

    fv.register()
    n, prompts = 2, 8
    uid = [f"q{i // n}" for i in range(n * prompts)]
    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(n * prompts, 3)
    old = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    td = micro_batch(old, adv, mask, uid, ["math"] * len(uid))
    failures = []
    for mini in tu.make_iterator(td, mini_batch_size=8, epochs=1, seed=0, dataloader_kwargs={"shuffle": shuffle}):
        for micro in tu.chunk_tensordict(mini, 2):  # ppo_micro_batch_size_per_gpu = 4, a multiple of rollout.n
            log_probs = flat_log_probs(micro["old_log_probs"], micro["response_mask"])
            try:
                fv.ppo_loss(domain_config(rollout_n=n), dict(log_probs=log_probs), micro)
            except ValueError as error:
                failures.append(str(error))
    if shuffle:
        assert failures and all(re.search(r"prompt group uid 'q\d+' has 1 responses", f) for f in failures)
    else:
        assert failures == []


@pytest.mark.parametrize("arg", ["old_log_prob", "log_prob", "advantages"])
def test_non_finite_response_token_is_named_and_padding_ignored(arg, batch):
    old, new, adv, mask = batch()
    inputs = dict(old_log_prob=old.clone(), log_prob=new.clone(), advantages=adv.clone())
    inputs[arg][0, 5] = float("nan")  # row 0 is padded from column 3 on
    clean, *_ = loss_and_grad(fv.fiberpo, old, new, adv, mask, config=config())
    dirty, *_ = loss_and_grad(fv.fiberpo, inputs["old_log_prob"], inputs["log_prob"], inputs["advantages"], mask,
                              config=config())
    assert torch.equal(clean, dirty)
    inputs[arg][1, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"^{arg} has a non-finite value at row 1, column 2"):
        fv.fiberpo(**inputs, response_mask=mask, config=config())
