"""Adapters: Postgres, Redis, the Airflow connections, the rates and price providers, migrations.

They move data in and out and mask secrets; no rule of the domain, nothing of the night or the dashboard.
"""
