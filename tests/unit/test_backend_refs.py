"""RFC 8620 §3.7 result references (gateway.backend.refs)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.backend.refs import evaluate, resolve_arguments
from gateway.errors import MethodError
from gateway.jmap.types import Invocation

RESPONSES: list[Invocation] = [
    ("Email/query", {"ids": ["m1", "m2"], "position": 0}, "q"),
    ("Email/get", {"list": [{"id": "m1", "threadId": "t1", "mailboxIds": {"a": True}},
                            {"id": "m2", "threadId": "t2", "mailboxIds": {"b": True}}]}, "g"),
    ("Thread/get", {"list": [{"id": "t1", "emailIds": ["m1", "m3"]}, {"id": "t2", "emailIds": ["m2"]}]}, "t"),
    ("Email/query", {"ids": ["later"]}, "q"),  # a duplicate call id: the first one wins
    ("error", {"type": "serverFail"}, "e"),
    ("Foo/get", {"a/b": {"~x": 1}}, "f"),
]


def ref(result_of: str, name: str, path: str) -> dict[str, str]:
    return {"resultOf": result_of, "name": name, "path": path}


@pytest.mark.parametrize(("reference", "expected"), [
    (ref("q", "Email/query", "/ids"), ["m1", "m2"]),
    (ref("q", "Email/query", "/ids/1"), "m2"),
    (ref("g", "Email/get", "/list/*/threadId"), ["t1", "t2"]),
    # `*` results that are arrays are flattened into one array.
    (ref("t", "Thread/get", "/list/*/emailIds"), ["m1", "m3", "m2"]),
    (ref("g", "Email/get", "/list/0/mailboxIds"), {"a": True}),
    (ref("f", "Foo/get", "/a~1b/~0x"), 1),
    (ref("q", "Email/query", ""), {"ids": ["m1", "m2"], "position": 0}),
])
def test_pointer_evaluation(reference: dict[str, str], expected: Any) -> None:
    assert evaluate(reference, RESPONSES) == expected


@pytest.mark.parametrize("reference", [
    ref("nope", "Email/query", "/ids"),  # no such call
    ref("q", "Email/get", "/ids"),  # name mismatch
    ref("e", "Email/get", "/list"),  # an error response never matches
    ref("q", "Email/query", "/missing"),
    ref("q", "Email/query", "/ids/2"),
    ref("q", "Email/query", "/ids/01"),
    ref("q", "Email/query", "ids"),  # not a pointer
    {"resultOf": "q", "name": "Email/query"},  # no path
    "q",
])
def test_invalid_references(reference: Any) -> None:
    with pytest.raises(MethodError) as info:
        evaluate(reference, RESPONSES)
    assert info.value.type_name == "invalidResultReference"


def test_resolve_arguments_replaces_hash_keys_and_refuses_both_forms() -> None:
    args = {"accountId": "A", "#ids": ref("q", "Email/query", "/ids")}
    assert resolve_arguments(args, RESPONSES) == {"accountId": "A", "ids": ["m1", "m2"]}
    with pytest.raises(MethodError) as info:
        resolve_arguments({"ids": [], "#ids": ref("q", "Email/query", "/ids")}, RESPONSES)
    assert info.value.type_name == "invalidArguments"
    plain = {"accountId": "A"}
    assert resolve_arguments(plain, RESPONSES) is plain
