"""Exchange-rate and price providers: one small interface each, database and HTTP adapters."""
