"""pushState cursors: round trip, versioning, unreadable tokens, and the diff that drives a resume."""

from __future__ import annotations

import base64
import string

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.fanout import pushstate

states = st.dictionaries(st.text(min_size=1, max_size=8),
                         st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4), max_size=3)
URL_SAFE = set(string.ascii_letters + string.digits + "-_")


def token_of(payload: bytes, version: str = "1") -> str:
    """A token around any msgpack payload, built the way the gateway builds its own."""
    return version + base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


@given(states)
def test_round_trip(s: dict[str, dict[str, str]]) -> None:
    token = pushstate.encode(s)
    assert token.isascii() and pushstate.decode(token) == s


@given(states)
def test_tokens_are_versioned_url_safe_and_unpadded(s: dict[str, dict[str, str]]) -> None:
    token = pushstate.encode(s)
    assert token[0] == "1"  # the version: a later format can tell old tokens apart
    assert set(token[1:]) <= URL_SAFE  # fits a URL or a JSON string without escaping; no "=" padding
    assert pushstate.encode(pushstate.decode(token) or {}) == token  # canonical: equal states, equal tokens


@given(states, st.sampled_from(["0", "2", "9", "a", "", " "]))
def test_another_version_is_unreadable(s: dict[str, dict[str, str]], version: str) -> None:
    body = pushstate.encode(s)[1:]
    assert pushstate.decode(version + body) is None


@pytest.mark.parametrize("token", [
    "",
    "1",
    "1!!!!",
    "1é",
    "1" + "A" * 5,  # base64 whose length cannot be right
    token_of(b"\xc1"),  # a byte msgpack never uses
    token_of(msgspec.msgpack.encode(["a", "b"])),  # msgpack, but not a map
    token_of(msgspec.msgpack.encode({"acc": "Email"})),  # the inner value is not a map
    token_of(msgspec.msgpack.encode({"acc": {"Email": 7}})),  # a state that is not a string
    token_of(msgspec.msgpack.encode({1: {"Email": "s"}})),  # an accountId that is not a string
    token_of(msgspec.msgpack.encode({"acc": {"Email": "s"}}) + b"\x00"),  # trailing bytes
    pushstate.encode({"acc": {"Email": "state-1", "Mailbox": "m"}})[:-3],  # truncated
])
def test_unreadable_tokens_decode_to_none(token: str) -> None:
    assert pushstate.decode(token) is None


@given(st.text(max_size=40).filter(lambda t: not t.startswith("1")))
def test_text_without_the_version_is_unreadable(token: str) -> None:
    assert pushstate.decode(token) is None


@given(st.binary(max_size=60))
def test_any_payload_decodes_to_valid_states_or_none(payload: bytes) -> None:
    decoded = pushstate.decode(token_of(payload))
    if decoded is not None:
        # Whatever it reads is shaped like states, and says the same once written again.
        assert all(isinstance(acc, str) and all(isinstance(t, str) and isinstance(s, str) for t, s in types.items())
                   for acc, types in decoded.items())
        assert pushstate.decode(pushstate.encode(decoded)) == decoded


def test_diff() -> None:
    current = {"A": {"Email": "2", "Mailbox": "1"}, "B": {"Email": "9"}}
    assert pushstate.diff(current, {"A": {"Email": "1", "Mailbox": "1"}, "B": {"Email": "9"}}) == {"A": {"Email": "2"}}
    assert pushstate.diff(current, current) == {}
    assert pushstate.diff(current, None) == current
    assert pushstate.diff(current, {}) == current


def test_diff_of_an_unreadable_token_leaves_out_empty_accounts() -> None:
    assert pushstate.diff({"A": {}, "B": {"Email": "1"}}, None) == {"B": {"Email": "1"}}


@given(states, states)
def test_applying_the_diff_brings_the_client_up_to_date(current: dict[str, dict[str, str]],
                                                        told: dict[str, dict[str, str]]) -> None:
    missed = pushstate.diff(current, told)
    for acc, types in missed.items():
        assert types and all(told.get(acc, {}).get(t) != s for t, s in types.items())
    # What the client holds after the push: what it was told, updated with what it missed.
    after = {acc: {**told.get(acc, {}), **missed.get(acc, {})} for acc in current}
    assert all(after[acc].get(t) == s for acc, types in current.items() for t, s in types.items())
    assert pushstate.diff(current, after) == {}
