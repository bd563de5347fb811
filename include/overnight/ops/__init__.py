"""Operations: preflight checks, audit retention, cache warming, Airflow metadata clean-up."""
