"""fiberpo_theory: checked mathematics and fast torch code for Fibration Policy Optimization."""

from .objectives import (
    aggregation_weights,
    apc_obj_gated_ratio,
    fiberpo_domain_gated_ratio,
    fiberpo_gated_ratio,
    fiberpo_jacobian,
    gspo_gated_ratio,
    grpo_gated_ratio,
    ppo_gated_ratio,
    rgf_objective,
)

__version__ = "0.1.0"
