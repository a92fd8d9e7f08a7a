"""fiberpo_theory: checked mathematics and fast torch code for Fibration Policy Optimization."""

from .hierarchy.fgh import fiberpo_hierarchy_gated_ratio
from .core.losses import POLICY_LOSSES
from .core.objectives import (
    aggregation_weights,
    apc_obj_gated_ratio,
    fiberpo_domain_gated_ratio,
    fiberpo_gated_ratio,
    fiberpo_jacobian,
    grpo_gated_ratio,
    gspo_gated_ratio,
    ppo_gated_ratio,
    rgf_objective,
)

__all__ = [
    "POLICY_LOSSES",
    "aggregation_weights",
    "apc_obj_gated_ratio",
    "fiberpo_domain_gated_ratio",
    "fiberpo_gated_ratio",
    "fiberpo_hierarchy_gated_ratio",
    "fiberpo_jacobian",
    "grpo_gated_ratio",
    "gspo_gated_ratio",
    "ppo_gated_ratio",
    "rgf_objective",
]

__version__ = "0.1.0"
