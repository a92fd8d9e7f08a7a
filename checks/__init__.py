"""Claim checks, one module per topic; each registers with ``fiberpo_theory.claims.claim``."""
