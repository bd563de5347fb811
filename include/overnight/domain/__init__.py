"""The domain: scoring, allocation, money, market calendars and freshness rules.

Pure rules and data (markets.yaml is the one file read); no database, cache, HTTP or Airflow import.
"""
