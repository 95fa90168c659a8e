"""Shared fixtures live in tests/plugins (loaded by pyproject's addopts)."""
