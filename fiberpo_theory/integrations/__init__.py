"""Adapters that plug FiberPO into training frameworks.

This package imports nothing heavy: ``fiberpo_theory.integrations.verl`` imports
verl and ``fiberpo_theory.integrations.trl`` imports TRL only when the user
imports that submodule.
"""
