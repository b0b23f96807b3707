"""Request admission shared by the socket and HTTP: capabilities, maxCallsInRequest, per-user in-flight."""

from __future__ import annotations

import pytest

from gateway.admission import UserLimiter, check_request
from gateway.errors import RequestLevelError
from gateway.jmap.types import CORE, ApiRequest


def test_unknown_capability_and_too_many_calls() -> None:
    check_request(ApiRequest(using=[CORE], methodCalls=[("Core/echo", {}, "0")] * 2), {CORE}, 2)
    with pytest.raises(RequestLevelError) as info:
        check_request(ApiRequest(using=[CORE, "urn:x"], methodCalls=[]), {CORE}, 2)
    assert info.value.type_uri.endswith("unknownCapability")
    with pytest.raises(RequestLevelError) as info:
        check_request(ApiRequest(using=[CORE], methodCalls=[("Core/echo", {}, "0")] * 3), {CORE}, 2)
    assert info.value.limit == "maxCallsInRequest"


def test_the_per_user_limit_holds_and_releases_even_on_errors() -> None:
    limiter = UserLimiter(2)
    with limiter.hold("bob"), limiter.hold("bob"):
        assert limiter.in_flight("bob") == 2
        with pytest.raises(RequestLevelError) as info, limiter.hold("bob"):
            pass
        assert info.value.limit == "maxConcurrentRequests"
        with limiter.hold("alice"):  # other users are not affected
            assert limiter.in_flight("alice") == 1
    with pytest.raises(ValueError), limiter.hold("bob"):
        raise ValueError("the request failed")
    assert limiter.in_flight("bob") == 0
