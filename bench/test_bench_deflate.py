"""Benchmarks of the permessage-deflate framing (RFC 7692 §7.2): gateway._deflate against its Python twin on
the two payloads the gateway sends most, a ~3 KiB Email/get response and a ~200 byte StateChange.

Not part of the test run (`testpaths` is tests/):
`python -m pytest bench/test_bench_deflate.py --benchmark-only`.
The compression ratio of each payload is attached to the results as `extra_info`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from types import ModuleType
from typing import Any

import pytest

LEVEL = 6
WBITS = 15


def _account(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()  # James-style accountId (DESIGN.md §5)


def email_get_response() -> bytes:
    """An RFC 8887 Response carrying an RFC 8621 Email/get of six messages: about 3 KiB of JSON."""
    account = _account("bob@example.com")
    emails: list[dict[str, Any]] = []
    for n in range(6):
        emails.append({
            "id": f"M{n:04d}a7c3e9f1b2d4",
            "blobId": f"B{n:04d}f0e1d2c3b4a5968778695a4b3c2d1e0f",
            "threadId": f"T{n // 2:04d}c0ffee",
            "mailboxIds": {"mb-inbox-0001": True},
            "keywords": {"$seen": True} if n % 2 else {},
            "size": 4000 + 731 * n,
            "receivedAt": f"2024-05-{10 + n:02d}T09:{10 + n:02d}:00Z",
            "from": [{"name": "Alice Example", "email": "alice@example.com"}],
            "to": [{"name": "Bob Example", "email": "bob@example.com"}],
            "subject": ["Quarterly report draft", "Re: lunch on Friday?", "Build failed on main",
                        "Re: Quarterly report draft", "Your order has shipped", "Team offsite agenda"][n],
            "preview": ["Hi Bob, attached is the first draft of the report for this quarter, please",
                        "Sounds good to me, the usual place at noon? I can book a table for four if",
                        "The nightly build of main failed in the integration stage after the update",
                        "Thanks Alice, I had a look at the numbers and left a few comments inline on",
                        "Good news! Your order #10442 is on its way and should arrive within three",
                        "Here is the plan for the two days: arrival Tuesday evening, workshops all"][n],
            "hasAttachment": n == 0,
        })
    response = {
        "@type": "Response",
        "requestId": "req-7f3a",
        "methodResponses": [["Email/get", {"accountId": account, "state": "s1842", "list": emails,
                                           "notFound": []}, "c1"]],
        "sessionState": "3e25b2a0",
    }
    return json.dumps(response, separators=(",", ":")).encode()


def state_change() -> bytes:
    """An RFC 8620 §7.1 StateChange for one account, as pushed over RFC 8887: about 200 bytes."""
    push = {"@type": "StateChange",
            "changed": {_account("bob@example.com"): {"Email": "s1843", "Mailbox": "s977",
                                                      "EmailDelivery": "s1843"}},
            "pushState": "eyJ2IjoxLCJzIjoxODQzfQ"}
    return json.dumps(push, separators=(",", ":")).encode()


PAYLOADS = {"email_get_3k": email_get_response(), "state_change_200": state_change()}


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "python":
        return importlib.import_module("gateway._deflate_py")
    try:
        return importlib.import_module("gateway._deflate")
    except ImportError:
        pytest.skip("compiled gateway._deflate is not built (make native)")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_compress(benchmark: Any, impl: ModuleType, payload: str) -> None:
    data = PAYLOADS[payload]
    compressor = impl.Compressor(LEVEL, WBITS)
    compressed = benchmark(compressor.compress, data)
    benchmark.extra_info.update(size=len(data), compressed=len(compressed),
                                ratio=round(len(data) / len(compressed), 2))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_inflate(benchmark: Any, impl: ModuleType, payload: str) -> None:
    data = PAYLOADS[payload]
    compressed = impl.Compressor(LEVEL, WBITS).compress(data)
    inflater = impl.Inflater(WBITS)
    assert benchmark(inflater.inflate, compressed, 1 << 20) == data
    benchmark.extra_info.update(size=len(data), compressed=len(compressed))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_round_trip(benchmark: Any, impl: ModuleType, payload: str) -> None:
    data = PAYLOADS[payload]
    compressor, inflater = impl.Compressor(LEVEL, WBITS), impl.Inflater(WBITS)

    def round_trip() -> bytes:
        result: bytes = inflater.inflate(compressor.compress(data), 1 << 20)
        return result

    assert benchmark(round_trip) == data
