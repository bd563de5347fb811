"""The night's log lines name users by the pseudonym `/audit` shows as `userRef` (docs/access.md): same function,
same key (the `overnight_pseudonym_key` Variable), so a holder of personal data maps one back through `/audit`."""

from __future__ import annotations

import uuid

import pytest

from overnight.adapters import pseudonyms
from overnight.dashboard import app as dashboard_app


def test_log_lines_use_the_audits_pseudonym(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY", "a-secret-shared-by-every-component")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "the-api-signing-key")
    pseudonyms._process_key.cache_clear()
    try:
        uid = str(uuid.uuid4())
        ref = pseudonyms.user_ref(uid)
        assert dashboard_app.pseudonym is pseudonyms.pseudonym and dashboard_app.pseudonym_key is pseudonyms.pseudonym_key
        assert ref == dashboard_app.pseudonym(dashboard_app.pseudonym_key(), uid)  # what /audit shows as userRef
        assert ref.startswith("u_") and len(ref) == 18 and uid not in ref
        assert pseudonyms.user_ref(str(uuid.uuid4())) != ref and pseudonyms.user_ref(None) == "-"
        monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "another-api-signing-key")
        assert pseudonyms.pseudonym(pseudonyms.pseudonym_key(), uid) == ref  # the API's signing key plays no part
        monkeypatch.setenv("AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY", "a-rotated-key")
        assert pseudonyms.pseudonym(pseudonyms.pseudonym_key(), uid) != ref  # keyed: not a plain hash of the id
    finally:
        pseudonyms._process_key.cache_clear()
