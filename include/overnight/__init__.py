"""Overnight pre-computation of investment recommendations (logic shared by DAGs and plugin)."""

__version__ = "0.1.0"  # as include/pyproject.toml says; part of every calculation's calcVersion
