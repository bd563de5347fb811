"""Developer tooling (benchmark, load generator, dev environment, seeding, `make run`).

Left out of the production image (.dockerignore): production code never imports it (pyproject.toml).
"""
