-- A holding without a usable quote is valued at its newest known price (docs/allocation.md): the newest quote
-- an earlier job run used for the symbol. This index finds it per symbol without reading every job run's
-- snapshot (a few thousand symbols x four markets x two years of nights).
CREATE INDEX overnight_job_prices_symbol_idx ON overnight_job_prices (symbol, as_of DESC);

-- A default contribution is never negative (docs/allocation.md: amounts + unallocated = the contribution). NOT VALID:
-- a row written before is not refused here (the calculation names it: stage load); new and changed rows are.
ALTER TABLE users ADD CONSTRAINT users_default_contribution_not_negative CHECK (default_contribution >= 0) NOT VALID;
