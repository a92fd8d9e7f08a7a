"""Claim checks, one module per topic; each registers with ``fiberpo_theory.theory.claims.claim``."""
