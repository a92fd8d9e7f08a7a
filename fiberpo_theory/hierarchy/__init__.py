"""Fibration hierarchies and the FGH operator on them.

``structure`` compiles a hierarchy (Def. 6.1) and owns its maps, kernels and
per-stratum sums over ranks; ``fgh`` is the operator (Eq. 26-29) and FiberPO
as one of its instances, with the App. E.7 masses that instance uses.  The
names of ``structure`` and the masses are importable from this package.
"""

from .fgh import mass_kernels, trajectory_mass
from .structure import (
    TOTAL,
    CompiledHierarchy,
    check_reflecting,
    compose,
    from_graph,
    from_ids,
    from_tree,
    global_counts,
    global_stratum_sums,
    kernel_matrix,
    projection_matrix,
    pushforward,
    reflect,
    reflecting_error,
    shared_strata,
    sum_children,
    to_graph,
    trajectory_length,
    uniform_kernel,
    weighted_kernel,
)

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
    "trajectory_mass",
    "mass_kernels",
    "kernel_matrix",
    "projection_matrix",
    "reflecting_error",
    "check_reflecting",
    "shared_strata",
    "global_stratum_sums",
    "global_counts",
]
