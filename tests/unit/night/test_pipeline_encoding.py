"""The batch writer's encodings: chunk ids, decimals."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from overnight.night import jobrun, trail


def test_chunk_ids_are_random_version_4_uuids_with_room_for_positions():
    """A chunk id names nobody: random, so nobody can compute it, or its events' ids, from a user id
    (docs/access.md); its last 20 bits are zero, where an event id puts its user's and its own position."""
    ids = [trail.new_chunk_id() for _ in range(4000)]
    assert len(set(ids)) == 4000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.int & 0xFFFFF == 0 and text.endswith("00000")
    corr, user = str(uuid.uuid4()), str(uuid.uuid4())
    old = {str(uuid.uuid5(uuid.UUID(corr), f"{user}:{t}"))[:31] for t in jobrun.EVENT_TYPES}  # the former, linkable id
    assert not old & {i[:31] for i in ids}


@pytest.mark.parametrize(("value", "text"), [
    ("116.78000000", "116.78"), ("100.00000000", "100"), ("1E+2", "100"), ("0.00012300", "0.000123"),
    ("5.350000000000", "5.35"), ("151.2", "151.2"), ("7", "7"), ("-3.50", "-3.5"),
])
def test_num_drops_trailing_zeros_and_keeps_the_value(value, text):
    assert jobrun._num(Decimal(value)) == text
    assert Decimal(text) == Decimal(value)
