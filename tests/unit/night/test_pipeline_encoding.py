"""The batch writer's text encodings: event ids, decimals, COPY values."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from overnight.night import jobrun, writing


def test_event_ids_are_random_version_4_uuids():
    """An event id names nobody: random, so nobody can compute it from a user id (docs/access.md)."""
    ids = writing.new_event_ids(4000)
    assert len(set(ids)) == 4000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    corr, user = str(uuid.uuid4()), str(uuid.uuid4())
    old = {str(uuid.uuid5(uuid.UUID(corr), f"{user}:{t}")) for t in jobrun.EVENT_TYPES}  # the former, linkable id
    assert not old & set(writing.new_event_ids(4))
    assert writing.new_event_ids(0) == []


@pytest.mark.parametrize(("value", "text"), [
    ("116.78000000", "116.78"), ("100.00000000", "100"), ("1E+2", "100"), ("0.00012300", "0.000123"),
    ("5.350000000000", "5.35"), ("151.2", "151.2"), ("7", "7"), ("-3.50", "-3.5"),
])
def test_num_drops_trailing_zeros_and_keeps_the_value(value, text):
    assert jobrun._num(Decimal(value)) == text
    assert Decimal(text) == Decimal(value)


def test_copy_json_doubles_backslashes_only():
    assert writing._copy_json('{"a": "x"}') == '{"a": "x"}'
    assert writing._copy_json('{"a": "\\n\\"q"}') == '{"a": "\\\\n\\\\"q"}'
