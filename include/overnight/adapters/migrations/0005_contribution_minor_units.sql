-- A user's default contribution is in their base currency's minor unit (ISO 4217), which has up to
-- four decimals (KWD and BHD three, CLF four): cents were not enough (docs/allocation.md).
ALTER TABLE users ALTER COLUMN default_contribution TYPE numeric(20, 4);
