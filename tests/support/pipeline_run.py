"""The one in-process driver of a market's pipeline for the tests: what a market DAG does, without Airflow.

`start` is the DAG's first three tasks (start the job run, fetch the rates, plan the batches);
`score_all` its mapped `score_batch` tasks and `finalize`; `run_pipeline` both on an open connection,
`run_market` on a connection of its own. Every argument a test varies (force, batch size, user ids,
the earlier markets, the rates or their clock, the price provider, the cache, the contribution, the
price judge, chunk size) is a keyword; the defaults are the DAG's: the database providers, the
earlier markets from the calendars, no cache warming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import psycopg
import redis

from overnight.adapters import cache
from overnight.adapters.providers.base import PriceProvider, RatesSnapshot
from overnight.adapters.providers.db import DbPriceProvider, DbRatesProvider
from overnight.domain import sessions
from overnight.domain.markets import load_markets
from overnight.night import jobrun, loading, pipeline, writing

CODES = load_markets().codes
Warmer = Callable[[list[tuple[str, str, str]]], int]


@dataclass
class Run:
    """One driven run: its job, rates, audience and batches; the results and summary once scored."""

    job: jobrun.JobRun
    rates: RatesSnapshot
    audience: jobrun.Audience
    batches: list[dict[str, Any]]
    results: list[dict[str, Any] | None] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def audience(market: str, session: date, user_ids: tuple[str, ...] | None = None) -> jobrun.Audience:
    """Who `market` serves on `session`: its users none of whose markets open earlier (optionally only `user_ids`)."""
    return jobrun.Audience(market, tuple(sessions.earlier_markets(market, session, CODES)), user_ids)


def warm_into(client: redis.Redis) -> Warmer:
    """The `warm_cache` callback writing the documents into `client`'s database."""
    return lambda docs: cache.warm(client, docs)


def make_latest(conn: psycopg.Connection, session: date) -> None:
    """Makes `session`'s documents the ones `recommendations` (the dashboard's table) will hold: the rows of newer
    sessions other tests left in the shared database go first (a run of an older session never replaces a newer
    document, docs/audit.md)."""
    conn.execute("DELETE FROM recommendations WHERE session_date > %s", (session,))
    conn.commit()


def start(conn: psycopg.Connection, market: str, session: date, name: str = "test-run", *, force: bool = False,
          batch_size: int = 100, user_ids: tuple[str, ...] | None = None,
          earlier: tuple[str, ...] | None = None, job: jobrun.JobRun | None = None,
          rates: RatesSnapshot | None = None, rates_now: datetime | None = None,
          contribution: jobrun.Contribution | None = None) -> Run:
    """Starts (or continues) the job run of (market, session), fetches the rates from the database (unless
    given; `rates_now` is their clock; the run's `contribution` currency among them, as the DAG's fetch_rates
    does) and plans the batches."""
    job = job or jobrun.start_job(conn, market, session, name, force=force)
    if rates is None:
        currencies = loading.needed_currencies(conn, also=[contribution.currency] if contribution else ())
        rates = loading.fetch_rates(conn, DbRatesProvider(conn), currencies, now=rates_now)
    aud = audience(market, session, user_ids) if earlier is None else jobrun.Audience(market, earlier, user_ids)
    return Run(job, rates, aud, loading.plan_batches(conn, aud, batch_size))


def score_all(conn: psycopg.Connection, run: Run, *, prices: PriceProvider | None = None,
              warm_cache: Warmer | None = None, tolerate: tuple[type[BaseException], ...] = (),
              **score: Any) -> Run:
    """Scores every batch of `run` (a batch raising one of `tolerate` is a failed task: rolled back, no result),
    then finalizes; `score` goes to `pipeline.score_batch` (contribution, judge_prices, chunk_size)."""
    prices = prices or DbPriceProvider(conn)
    for batch in run.batches:
        try:
            run.results.append(pipeline.score_batch(conn, run.job, run.audience, run.rates, batch, prices,
                                                    warm_cache=warm_cache, **score))
        except tolerate:
            conn.rollback()
            run.results.append(None)
    run.summary = writing.finalize(conn, run.job, planned=run.batches, results=run.results,
                                    rates=run.rates.to_xcom())
    return run


def run_pipeline(conn: psycopg.Connection, market: str, session: date, name: str = "test-run", *,
                 force: bool = False, batch_size: int = 100, user_ids: tuple[str, ...] | None = None,
                 earlier: tuple[str, ...] | None = None, job: jobrun.JobRun | None = None,
                 rates: RatesSnapshot | None = None, rates_now: datetime | None = None,
                 redis_client: redis.Redis | None = None, **scoring: Any) -> Run:
    """A whole run of (market, session) on `conn`; with `redis_client` the documents are warmed into it."""
    run = start(conn, market, session, name, force=force, batch_size=batch_size, user_ids=user_ids,
                earlier=earlier, job=job, rates=rates, rates_now=rates_now, contribution=scoring.get("contribution"))
    if redis_client is not None:
        scoring.setdefault("warm_cache", warm_into(redis_client))
    return score_all(conn, run, **scoring)


def run_market(dsn: str, market: str, session: date, name: str = "test-run", *, redis_url: str | None = None,
               latest: bool = False, **kw: Any) -> Run:
    """`run_pipeline` on a connection of its own to `dsn`, warming `redis_url`'s database when given; with `latest`,
    its documents become the dashboard's (`make_latest`)."""
    client = redis.Redis.from_url(redis_url) if redis_url else None
    try:
        with psycopg.connect(dsn) as conn:
            if latest:
                make_latest(conn, session)
            return run_pipeline(conn, market, session, name, redis_client=client, **kw)
    finally:
        if client is not None:
            client.close()
