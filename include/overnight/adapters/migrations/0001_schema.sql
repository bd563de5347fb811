-- The application schema: reference data, users and their portfolios, criteria, prices and rates.
-- Big child tables (holdings, watchlist, allocation targets) carry no foreign keys so that seeding
-- and the app's own loads stay bulk-fast; the seeder's tests check their references instead.

CREATE TABLE asset_classes (
    id      smallint PRIMARY KEY,
    name    text NOT NULL UNIQUE
);

CREATE TABLE assets (
    id            integer PRIMARY KEY,
    symbol        text NOT NULL UNIQUE,
    name          text NOT NULL,
    market        text NOT NULL,
    class_id      smallint NOT NULL REFERENCES asset_classes (id),
    currency      char(3) NOT NULL,
    fundamentals  jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX assets_market_idx ON assets (market);

-- Latest known price per asset (the database price provider reads it; the HTTP one refreshes it).
CREATE TABLE prices (
    asset_id  integer PRIMARY KEY REFERENCES assets (id),
    price     numeric(24, 8),
    currency  char(3) NOT NULL,
    as_of     timestamptz NOT NULL
);

-- Exchange rates: 1 base = rate quote, as of a time; every fetch is kept (stale fallback, audit).
CREATE TABLE exchange_rates (
    base        char(3) NOT NULL,
    quote       char(3) NOT NULL,
    rate        numeric(28, 12) NOT NULL CHECK (rate > 0),
    as_of       timestamptz NOT NULL,
    source      text NOT NULL,
    fetched_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (base, quote, as_of)
);
CREATE INDEX exchange_rates_latest_idx ON exchange_rates (base, as_of DESC);

-- Scoring criteria, versioned: a template (key 'tpl-NN') or a user's own (key 'user-<id>').
CREATE TABLE criteria_sets (
    id            uuid PRIMARY KEY,
    criteria_key  text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    name          text NOT NULL,
    rules         jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (criteria_key, version)
);

CREATE TABLE users (
    id                    uuid PRIMARY KEY,
    email                 text NOT NULL UNIQUE,
    base_currency         char(3) NOT NULL,
    default_contribution  numeric(20, 2),
    markets               text[] NOT NULL,
    criteria_key          text NOT NULL,
    active                boolean NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_markets_idx ON users USING gin (markets) WHERE active;

CREATE TABLE allocation_targets (
    user_id   uuid NOT NULL,
    class_id  smallint NOT NULL,
    min_pct   numeric(7, 3) NOT NULL,
    max_pct   numeric(7, 3) NOT NULL,
    PRIMARY KEY (user_id, class_id)
);

CREATE TABLE holdings (
    user_id   uuid NOT NULL,
    asset_id  integer NOT NULL,
    quantity  numeric(24, 8),
    PRIMARY KEY (user_id, asset_id)
);

CREATE TABLE watchlist (
    user_id   uuid NOT NULL,
    asset_id  integer NOT NULL,
    PRIMARY KEY (user_id, asset_id)
);
