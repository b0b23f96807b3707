"""The JSON nesting scan (`json_too_deep`) of gateway._coalesce and its twin, and the codec's use of it."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import native
from gateway.errors import NOT_JSON, NOT_REQUEST, RequestLevelError
from gateway.jmap.codec import decode_api_request, decode_client
from gateway.jmap.types import Request
from tests.native_impl import load_impl


@pytest.fixture(scope="module", params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("_coalesce", request.param)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@pytest.mark.parametrize(("text", "limit", "deep"), [
    (b"1", 0, False), (b"[]", 0, True), (b"[]", 1, False), (b"[[{}]]", 2, True), (b"[[{}]]", 3, False),
    (b'["[[[["]', 1, False),            # brackets in strings do not count
    (b'["\\"[[["]', 1, False),          # nor after an escaped quote
    (b'["\\\\"[[]]', 1, True),          # an escaped backslash ends with the string's quote
    (b"]]]][[", 2, False),              # closers without openers are ignored, not negative depth
    (b"[" * 100_000 + b"]" * 100_000, 64, True),
    (b'{"a":' * 64 + b"1" + b"}" * 64, 64, False),
    (b'{"a":' * 65 + b"1" + b"}" * 65, 64, True),
])
def test_cases(impl: ModuleType, text: bytes, limit: int, deep: bool) -> None:
    assert impl.json_too_deep(text, limit) is deep
    assert impl.json_too_deep(bytearray(text), limit) is deep
    assert impl.json_too_deep(memoryview(text), limit) is deep


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3), inner,
                                                                 max_size=3),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(value=json_values, limit=st.integers(0, 12))
def test_agrees_with_the_depth_of_valid_json(value: Any, limit: int) -> None:
    text = json.dumps(value).encode()
    for module in (native.load("_coalesce", native=False), native.load("_coalesce")):
        assert module.json_too_deep(text, limit) is (depth(value) > limit)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | st.text(alphabet='[]{}"\\ x').map(str.encode), limit=st.integers(0, 8))
def test_native_and_twin_agree_on_any_bytes(data: bytes, limit: int) -> None:
    compiled = load_impl("_coalesce", "native")
    assert compiled.json_too_deep(data, limit) is native.load("_coalesce", native=False).json_too_deep(data, limit)


def test_deep_socket_message_is_not_json_before_parsing() -> None:
    # Issue 16 (1): 100,000 nested arrays raised RecursionError in the codec (the socket closed with 1011).
    with pytest.raises(RequestLevelError) as info:
        decode_client(b"[" * 100_000 + b"]" * 100_000)
    assert info.value.type_uri == NOT_JSON and "64" in info.value.detail
    with pytest.raises(RequestLevelError) as info:
        decode_api_request(b'{"using":[],"methodCalls":[],"x":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001)
    assert info.value.type_uri == NOT_JSON


def test_nesting_up_to_the_limit_decodes() -> None:
    arg = json.dumps({"x": json.loads("[" * 60 + "]" * 60)})
    text = f'{{"@type":"Request","using":[],"methodCalls":[["Core/echo",{arg},"c"]]}}'.encode()
    assert depth(json.loads(text)) == 64
    assert isinstance(decode_client(text), Request)
    with pytest.raises(RequestLevelError) as info:
        decode_client(text, max_depth=63)
    assert info.value.type_uri == NOT_JSON


def test_an_invalid_message_within_the_limit_is_still_not_request() -> None:
    with pytest.raises(RequestLevelError) as info:
        decode_client(b'{"@type":"Request","id":"r1","using":' + b"[" * 50 + b"]" * 50 + b"}")
    assert info.value.type_uri == NOT_REQUEST
