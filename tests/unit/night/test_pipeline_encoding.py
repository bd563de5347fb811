"""The batch writer's text encodings: event ids, decimals, COPY values."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from overnight.night import jobrun, writing


def test_event_id_text_is_the_uuid5_of_the_event():
    for _ in range(200):
        corr, user = str(uuid.uuid4()), str(uuid.uuid4())
        for etype in jobrun.EVENT_TYPES:
            text = writing._event_id_text(uuid.UUID(corr).bytes, user, etype)
            assert text == str(writing.event_id(corr, user, etype))


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
