"""Overnight pre-computation of investment recommendations (logic shared by DAGs and plugin)."""
