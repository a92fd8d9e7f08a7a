"""The torch core: the gating maps of every objective and what they stand on.

Nothing here imports the layers above (hierarchies, theory, symbolic, tools).
``segments`` and ``layout`` index the flat token batch, ``gates`` holds the
atomic gates, ``baselines`` / ``fused`` / ``objectives`` the gated ratios
(``native``: the compiled token loops the fused gate runs on CPU),
``distributed`` the collectives over data-parallel ranks, ``diagnostics`` the
regime labels and ``losses`` the verl-style loss registry.
"""
