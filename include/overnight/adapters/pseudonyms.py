"""Users' pseudonyms: what people without the personal-data permission see instead of a user id.

A pseudonym is `u_` and 16 hex digits of HMAC-SHA256(key, user id). The key comes from a secret of its own,
the Airflow Variable `overnight_pseudonym_key` (`AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY` or a secrets backend:
docs/deploy.md says how to make and rotate it), so every process reading it gives a user the same pseudonym:
the dashboard's `/audit` (`userRef`, shown to everyone) and the night's task log lines (which any viewer of
Airflow reads). A holder of "Overnight recommendations" maps one back through `/audit`, which shows them
`userId` beside `userRef` (docs/access.md). Without the Variable the key is random per process: pseudonyms
then match nothing else, and still name nobody. (It used to be derived from `[api_auth] jwt_secret`, which put
the API's signing key into every task process.)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os

log = logging.getLogger(__name__)

_CONTEXT = b"overnight audit user pseudonym v1"
KEY_VARIABLE = "overnight_pseudonym_key"


def _secret(server: bool) -> str:
    """The Variable's value through Airflow (environment, secrets backends; the metadata database on a server)."""
    value = os.environ.get(f"AIRFLOW_VAR_{KEY_VARIABLE.upper()}", "")
    if value:
        return value
    try:
        from airflow.sdk import Variable

        value = Variable.get(KEY_VARIABLE, default=None) or ""
    except Exception:  # noqa: BLE001 - no Airflow to ask: a key of this process
        value = ""
    if not value and server:
        try:
            from airflow.models.variable import Variable as StoredVariable

            value = StoredVariable.get(KEY_VARIABLE, default_var=None) or ""
        except Exception:  # noqa: BLE001 - not in the metadata database either
            value = ""
    return str(value)


def pseudonym_key(*, server: bool = False) -> bytes:
    """The pseudonyms' key: derived from the `overnight_pseudonym_key` Variable (never shown), else random per
    process (with a warning: its pseudonyms match no other process's). `server=True`: the api-server, which
    may also read the Variable from the metadata database."""
    secret = _secret(server)
    if not secret:
        log.warning("no Airflow Variable %s: pseudonyms of this process match no other's (set "
                    "AIRFLOW_VAR_%s or the Variable; docs/deploy.md)", KEY_VARIABLE, KEY_VARIABLE.upper())
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
