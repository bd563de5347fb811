"""Users' pseudonyms: what people without the personal-data permission see instead of a user id.

A pseudonym is `u_` and 16 hex digits of HMAC-SHA256(key, user id). The key is derived from Airflow's
`[api_auth] jwt_secret` (`AIRFLOW__API_AUTH__JWT_SECRET`), so every process sharing that secret gives a
user the same pseudonym: the dashboard's `/audit` (`userRef`, shown to everyone) and the night's task log
lines (which any viewer of Airflow reads). A holder of "Overnight recommendations" maps one back through
`/audit`, which shows them `userId` beside `userRef` (docs/access.md). Without the secret the key is random
per process: pseudonyms then match nothing else, and still name nobody.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os

_CONTEXT = b"overnight audit user pseudonym v1"


def pseudonym_key() -> bytes:
    """The pseudonyms' key: derived from Airflow's JWT secret (never shown), else random per process."""
    secret = os.environ.get("AIRFLOW__API_AUTH__JWT_SECRET", "")
    if not secret:
        try:
            from airflow.configuration import conf

            secret = conf.get("api_auth", "jwt_secret", fallback="") or ""
        except Exception:  # noqa: BLE001 - no Airflow config: a key of this process
            secret = ""
    if not secret:
        return os.urandom(32)
    return hmac.new(secret.encode(), _CONTEXT, hashlib.sha256).digest()


def pseudonym(key: bytes, user_id: str) -> str:
    """A user's pseudonym: `u_` and 16 hex digits of HMAC-SHA256(key, user id)."""
    return "u_" + hmac.new(key, str(user_id).encode(), hashlib.sha256).hexdigest()[:16]


@functools.cache
def _process_key() -> bytes:
    return pseudonym_key()


def user_ref(user_id: str | None) -> str:
    """The pseudonym of `user_id` under this process's key (read once): for log lines. None stays "-"."""
    return "-" if user_id is None else pseudonym(_process_key(), user_id)
