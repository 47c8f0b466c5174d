"""The hot-path conversions agree with protobuf's own: Values as json_format reads and writes them,
JobEvents messages as protobuf parses them, and Timestamps as FromMilliseconds sets them."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from jobgate.v1 import job_pb2, relay_pb2
from protocol.codec import MAX_MS, events_message, python_to_value, set_ms, value_to_python

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**60), 2**60)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_like)
def test_values_convert_exactly_as_json_format_does(obj: Any) -> None:
    ours, theirs = Value(), Value()
    python_to_value(obj, ours)
    json_format.ParseDict(obj, theirs)
    assert ours == theirs
    assert value_to_python(ours) == json_format.MessageToDict(theirs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "x"}, b"bytes", {1, 2}, object(), 2**2000])
def test_values_that_are_not_json_are_refused(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        python_to_value({"nested": [bad]}, Value())


@given(st.lists(st.binary(max_size=300), max_size=5))
def test_events_messages_parse_as_the_events_in_order(outputs: list[bytes]) -> None:
    events = [job_pb2.JobEvent(job_id=f"{i:032x}", state=4, output=o) for i, o in enumerate(outputs)]
    assert list(relay_pb2.JobEvents.FromString(events_message(events)).events) == events


@given(st.integers(-(2**62), 2**62) | st.sampled_from([0, 1, 999, 1000, 1001, MAX_MS, MAX_MS + 1, -1, -1000]))
def test_timestamps_are_set_exactly_as_from_milliseconds_sets_them(ms: int) -> None:
    ours, theirs = Timestamp(), Timestamp()
    try:
        theirs.FromMilliseconds(ms)
    except ValueError:
        with pytest.raises(ValueError):
            set_ms(ours, ms)
        return
    set_ms(ours, ms)
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
