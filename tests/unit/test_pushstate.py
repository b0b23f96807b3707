"""pushState cursors: round trip, unreadable tokens, and the diff that drives a resume."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.fanout import pushstate

states = st.dictionaries(st.text(min_size=1, max_size=8),
                         st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4), max_size=3)


@given(states)
def test_round_trip(s: dict[str, dict[str, str]]) -> None:
    token = pushstate.encode(s)
    assert token.isascii() and pushstate.decode(token) == s


@given(st.text(max_size=40))
def test_garbage_never_raises(token: str) -> None:
    decoded = pushstate.decode(token)
    assert decoded is None or isinstance(decoded, dict)


def test_diff() -> None:
    current = {"A": {"Email": "2", "Mailbox": "1"}, "B": {"Email": "9"}}
    assert pushstate.diff(current, {"A": {"Email": "1", "Mailbox": "1"}, "B": {"Email": "9"}}) == {"A": {"Email": "2"}}
    assert pushstate.diff(current, current) == {}
    assert pushstate.diff(current, None) == current
    assert pushstate.diff(current, {}) == current
