"""FiberPO, FiberPO-Domain and APC-Obj inside TRL's ``GRPOTrainer``.

TRL has no loss registry; its GRPO loss lives in ``GRPOTrainer._compute_loss``.
:class:`FiberPOTrainer` overrides that one method and keeps everything else of
TRL (generation, rewards, group-normalised advantages, buffering, logging)::

    from fiberpo_theory.integrations.trl import FiberPOConfig, FiberPOTrainer
    args = FiberPOConfig(output_dir="out", fiberpo_method="fiberpo", epsilon=0.04,
                         fiberpo_c_pos=0.12, fiberpo_c_neg=0.05, num_generations=4)
    trainer = FiberPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)

The loss is ``-J`` with ``J = Σ_i μ_i G(r)_i Â_i`` (paper Eq. 2), the gated
ratio ``G`` from :mod:`fiberpo_theory.core.objectives` and μ from
:func:`~fiberpo_theory.core.objectives.aggregation_weights`: TRL's ``loss_type="grpo"``
is the trajectory μ = 1/(|Tj| T_τ) and ``"bnpo"`` the token μ = 1/N, each over
one micro-batch, divided by the gradient-accumulation steps as TRL does;
``"dr_grpo"`` is the constant μ = 1/(B · max_completion_length) over the B rows
of the micro-batch (also divided by the accumulation steps), and ``"dapo"`` (TRL's
default) the constant μ = 1/(tokens of the whole accumulation window), TRL's
``num_items_in_batch`` spread over the processes and steps.

Ids, from what TRL has:

* prompt group: TRL's own advantage group, ``num_generations`` consecutive
  rows of the generation batch (``RepeatSampler``); the id is the row's global
  index divided by ``num_generations``.
* domain (FiberPO-Domain): the dataset column named by ``fiberpo_domain_column``
  (e.g. ``"data_source"``), one label per prompt; ``None`` puts every prompt in
  one domain.
* state (APC-Obj): the prompt's tokens plus the completion prefix before the
  token, so completions of one prompt share their first state.

FiberPO-Domain and APC-Obj need whole prompt groups in every micro-batch (the
group aggregate of Eq. 31 is a mean over all responses of a prompt; APC-Obj's
budget of Eq. 59 sums over every token drawn in a state, and the completions
of a prompt share their first state); a split group raises ``ValueError``
naming it, and the config refuses settings that split them.  TRL keeps groups whole when
``steps_per_generation == 1`` (each micro-batch is its own generation batch;
TRL shuffles rows before cutting a generation batch into
``steps_per_generation`` slices) and ``per_device_train_batch_size`` (the
rows of one process) is a multiple of ``num_generations``.
``gradient_accumulation_steps`` may be anything then.  Domains span
micro-batches anyway: the domain level sees the groups of its micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..core import baselines, diagnostics, objectives
from ..core.layout import flatten_mask, to_flat, trajectory_segments
from ._common import require_whole_groups, string_ids

__all__ = ["FiberPOConfig", "FiberPOTrainer", "prefix_state_ids", "METHODS"]

METHODS = ("fiberpo", "fiberpo_domain", "apc_obj")
COUPLED_METHODS = ("fiberpo_domain", "apc_obj")  # their gates couple the completions of one prompt
# TRL loss_type -> the μ of Eq. 2 it aggregates with, before the constant factor _mu_scale applies
_AGGREGATION = {"grpo": "trajectory", "bnpo": "token", "dr_grpo": "token", "dapo": "token"}
_WINDOW_NORMALISED = ("dapo",)  # μ already counts the accumulation window: no division by its steps
# model inputs TRL forwards for multimodal batches; passed through unchanged
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class FiberPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the FiberPO hyper-parameters.

    TRL's ``epsilon`` is FiberPO's fiber clip ε (Eq. 12, a clip of the
    per-token log-ratio residual, the role PPO's ε plays per token); the clip is
    symmetric in log space, so ``epsilon_high`` must be unset or equal to
    ``epsilon``.  ``loss_type`` picks μ: ``None`` (default) is the method's own
    (trajectory μ for FiberPO / FiberPO-Domain, token μ for APC-Obj), ``"grpo"``
    the trajectory μ, ``"bnpo"`` the token μ, ``"dr_grpo"`` 1/(rows ·
    max_completion_length) and ``"dapo"`` 1/(tokens of the accumulation window),
    as TRL normalises those.  TRL features that change the loss
    outside the gated ratio (``beta``, ``delta``, entropy bonus or mask,
    off-policy mask, vLLM importance correction, sequence-level sampling) raise
    ``ValueError`` rather than being dropped silently.
    """

    fiberpo_method: str = field(
        default="fiberpo",
        metadata={"help": "'fiberpo' (Eq. 6-16), 'fiberpo_domain' (Eq. 30-33) or 'apc_obj' (Eq. 59)."},
    )
    fiberpo_c_pos: float = field(
        default=0.12, metadata={"help": "Positive-channel budget C⁺ > 0 of the base weight (Eq. 8, 10)."}
    )
    fiberpo_c_neg: float = field(
        default=0.05, metadata={"help": "Negative-channel budget C⁻ > 0 of the base weight (Eq. 8, 10)."}
    )
    fiberpo_k: float | None = field(
        default=None, metadata={"help": "Rollback slope k of g_agg (Eq. 10); None = trajectory length T_τ."}
    )
    apc_delta: float | None = field(
        default=None, metadata={"help": "APC-Obj per-state TV budget δ > 0 (Eq. 59); required for 'apc_obj'."}
    )
    fiberpo_domain_column: str | None = field(
        default=None, metadata={"help": "Dataset column holding each prompt's domain label for 'fiberpo_domain'."}
    )
    loss_type: str | None = field(
        default=None,
        metadata={"help": "μ of Eq. 2: None = the method's own, 'grpo' = 1/(|Tj| T_τ), 'bnpo' = 1/N, "
                          "'dr_grpo' = 1/(rows · max_completion_length), 'dapo' = 1/(tokens of the window)."},
    )

    def __post_init__(self):
        if self.fiberpo_method not in METHODS:
            raise ValueError(f"fiberpo_method must be one of {METHODS}, got {self.fiberpo_method!r}")
        if self.loss_type is None:
            self.loss_type = "bnpo" if self.fiberpo_method == "apc_obj" else "grpo"
        if self.loss_type not in _AGGREGATION:
            raise ValueError(f"loss_type must be None or one of {tuple(_AGGREGATION)} with FiberPO (the others "
                             f"change the per-token loss, not μ), got {self.loss_type!r}")
        super().__post_init__()
        _positive("epsilon", self.epsilon)
        if self.epsilon_high is not None and self.epsilon_high != self.epsilon:
            raise ValueError("epsilon_high must be None or equal to epsilon: FiberPO's fiber clip is symmetric")
        _positive("fiberpo_c_pos", self.fiberpo_c_pos)
        _positive("fiberpo_c_neg", self.fiberpo_c_neg)
        if self.fiberpo_k is not None:
            _positive("fiberpo_k", self.fiberpo_k)
        if self.fiberpo_method == "apc_obj":
            if self.apc_delta is None:
                raise ValueError("apc_delta is required for fiberpo_method='apc_obj' (a TV budget > 0)")
            _positive("apc_delta", self.apc_delta)
        self._refuse_loss_changes()
        if self.fiberpo_method in COUPLED_METHODS:
            self._require_whole_groups()

    def _require_whole_groups(self):
        # the trainer checks every micro-batch too (e.g. groups spread over processes); this names the setting early
        method = self.fiberpo_method
        if self.steps_per_generation != 1:
            raise ValueError(
                f"steps_per_generation must be 1 with fiberpo_method={method!r}, got {self.steps_per_generation}: "
                "TRL shuffles the rows of a generation batch before cutting it into steps_per_generation "
                "micro-batches, which splits prompt groups (set steps_per_generation=1 explicitly when "
                "gradient_accumulation_steps > 1)"
            )

    def _refuse_loss_changes(self):
        unsupported = {
            "beta": self.beta != 0.0,
            "delta": self.delta is not None,
            "entropy_coef": self.entropy_coef != 0.0 or self.use_adaptive_entropy,
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "importance_sampling_level": self.importance_sampling_level != "token",
            "vllm_importance_sampling_correction": self.use_vllm and self.vllm_importance_sampling_correction,
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported with FiberPO (leave it at its default)")


def prefix_state_ids(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` id of the state each completion token is drawn in: (prompt, completion prefix).

    Two tokens share a state exactly when their prompts and all earlier
    completion tokens agree; ids are the nodes of the batch's prefix tree.
    """
    _, state = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    columns, offset = [], 0
    for t in range(completion_ids.shape[1]):
        columns.append(state + offset)
        offset += int(state.max()) + 1
        _, state = torch.unique(torch.stack([state, completion_ids[:, t]], dim=1), dim=0, return_inverse=True)
    return torch.stack(columns, dim=1)


class FiberPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose policy loss is FiberPO / FiberPO-Domain / APC-Obj (see the module docstring)."""

    def __init__(self, model, reward_funcs, args: FiberPOConfig, **kwargs):
        if not isinstance(args, FiberPOConfig):
            raise ValueError(f"args must be a FiberPOConfig (GRPOConfig plus the FiberPO fields), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef must be 0 with FiberPO (the router auxiliary loss is not supported)")

    # -- ids -----------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = output["completion_ids"].device
        mode = "train" if self.model.training else "eval"
        size = self.num_generations if mode == "train" else self.num_generations_eval
        # TRL's advantage groups: num_generations consecutive rows of the global generation batch
        start = self.accelerator.process_index * len(inputs)
        output["fiberpo_group_id"] = (torch.arange(len(inputs), device=device) + start) // size
        output["fiberpo_domain_id"] = self._domain_ids(inputs).to(device)
        return output

    def _domain_ids(self, inputs) -> torch.Tensor:
        column = self.args.fiberpo_domain_column
        if column is None:
            return torch.zeros(len(inputs), dtype=torch.long)
        missing = [i for i, row in enumerate(inputs) if column not in row]
        if missing:
            raise ValueError(f"fiberpo_domain_column {column!r} is missing from dataset row {missing[0]}")
        return string_ids(row[column] for row in inputs)

    # -- loss ----------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        forward = {key: inputs.get(key) for key in _FORWARD_KEYS}
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), **forward
        )
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        # on-policy micro-batches carry no old log-probs: r = 1 with the gradient of log π_θ
        log_ratio = logps - (logps.detach() if old is None else old)

        loss = self._fiberpo_loss(log_ratio, inputs, mask)
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.args.loss_type not in _WINDOW_NORMALISED:
            loss = loss / self.current_gradient_accumulation_steps  # TRL turns off HF's accumulation scaling
        return loss

    def _fiberpo_loss(self, log_ratio, inputs, mask) -> torch.Tensor:
        """``-J`` (Eq. 2) over the rows with response tokens, scaled as TRL's mean over all rows."""
        args = self.args
        groups = inputs["fiberpo_group_id"]
        if args.fiberpo_method in COUPLED_METHODS:
            size = self.num_generations if self.model.training else self.num_generations_eval
            require_whole_groups(groups, size, name="prompt group")
        keep = mask.bool().any(dim=1)  # rows TRL masked out entirely (e.g. truncated) carry no tokens
        if not bool(keep.any()):
            return (log_ratio * 0.0).sum()
        batch = flatten_mask(mask[keep])
        x = to_flat(log_ratio[keep], batch, "log_ratio")
        advantages = to_flat(inputs["advantages"][keep], batch, "advantages")
        traj = trajectory_segments(batch)  # the rows by their lengths, indexed once for the gate, metrics and μ
        with diagnostics.counting_gate() as counted:
            gated = self._gated_ratio(x, batch, traj, inputs, keep)
        self._log_gate(x.detach(), gated.detach(), traj, counted)
        weights = objectives.aggregation_weights(_AGGREGATION[args.loss_type], x, traj)
        return -objectives.rgf_objective(gated, advantages, weights) * self._mu_scale(keep, x.numel(), inputs)

    def _mu_scale(self, keep, tokens: int, inputs):
        """The constant that turns the kept rows' μ into TRL's normaliser of ``loss_type`` (empty rows add zero)."""
        loss_type = self.args.loss_type
        if loss_type == "grpo":  # a mean over all rows of the micro-batch
            return keep.sum() / keep.numel()
        if loss_type == "dr_grpo":  # 1/N -> 1/(B · max_completion_length)
            return tokens / (keep.numel() * self.args.max_completion_length)
        if loss_type == "dapo":  # 1/N -> 1/(the window's tokens), num_items_in_batch spanning the generation batch
            window = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if self.model.training:
                window = window * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return tokens / window
        return 1.0

    @torch.no_grad()
    def _log_gate(self, x, gated, traj, counted):
        """Per-micro-batch gate statistics under ``fiberpo/`` in TRL's logs (this process's rows)."""
        args = self.args
        metrics = {"clip_fraction": diagnostics.clip_fraction(x.exp(), gated)}
        if args.fiberpo_method == "fiberpo":
            hyper = dict(eps=args.epsilon, c_pos=args.fiberpo_c_pos, c_neg=args.fiberpo_c_neg, k=args.fiberpo_k)
            metrics.update(diagnostics.fiberpo_loss_metrics(x, traj, counted=counted, **hyper))
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][f"fiberpo/{key}"].append(value)

    def _gated_ratio(self, x, batch, traj, inputs, keep) -> torch.Tensor:
        args = self.args
        budgets = dict(eps=args.epsilon, c_pos=args.fiberpo_c_pos, c_neg=args.fiberpo_c_neg)
        if args.fiberpo_method == "fiberpo":
            return objectives.fiberpo_gated_ratio(x, traj, k=args.fiberpo_k, **budgets)
        if args.fiberpo_method == "fiberpo_domain":
            groups = to_flat(inputs["fiberpo_group_id"][keep], batch, "group ids")
            domains = to_flat(inputs["fiberpo_domain_id"][keep], batch, "domain ids")
            return objectives.fiberpo_domain_gated_ratio(x, traj, groups, domains, **budgets)
        states = prefix_state_ids(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"])
        ratio = baselines.bounded_ratio(x)  # exp overflows past |x| ~ 88 in fp32
        return objectives.apc_obj_gated_ratio(ratio, to_flat(states[keep], batch, "state ids"), delta=args.apc_delta)
