"""Worked examples: third-party-style code to audit (see docs/audit.md)."""
