"""The one error mapper: every error the gateway raises has one HTTP answer and one RequestError."""

from __future__ import annotations

import json

import pytest

from gateway.errors import (
    LIMIT,
    SERVER_FAIL,
    SERVER_UNAVAILABLE,
    Forbidden,
    HTTPProblem,
    RequestLevelError,
    Unauthorized,
    Unavailable,
    problem_of,
    problem_response,
    request_error_of,
)


@pytest.mark.parametrize(("error", "status", "type_uri", "headers"), [
    (RequestLevelError(LIMIT, "too many", limit="maxCallsInRequest"), 400, LIMIT, {}),
    (HTTPProblem(429, "slow down", headers={"Retry-After": "10"}), 429, "about:blank", {"Retry-After": "10"}),
    (Unauthorized("who?", 'Basic realm="jmap"'), 401, "about:blank", {"WWW-Authenticate": 'Basic realm="jmap"'}),
    (Forbidden("not you"), 403, "about:blank", {}),
    (Unavailable("upstream down"), 503, "about:blank", {"Retry-After": "5"}),
    (RuntimeError("a bug"), 500, "about:blank", {}),
])
def test_http_answers(error: BaseException, status: int, type_uri: str, headers: dict[str, str]) -> None:
    problem = problem_of(error)
    assert (problem.status, problem.type_uri, problem.headers) == (status, type_uri, headers)
    body = json.loads(problem.body())
    assert body["status"] == status and body["type"] == type_uri and body["title"]
    if isinstance(error, RuntimeError):
        assert "a bug" not in problem.detail  # internal errors are not described to the peer


@pytest.mark.parametrize(("error", "status", "type_uri"), [
    (RequestLevelError(LIMIT, "too many", limit="maxCallsInRequest"), 400, LIMIT),
    (Unavailable("upstream down"), 503, SERVER_UNAVAILABLE),
    (Unauthorized("revoked"), 401, "about:blank"),
    (Forbidden("not you"), 403, "about:blank"),
    (KeyError("a bug"), 500, SERVER_FAIL),
])
def test_socket_answers(error: BaseException, status: int, type_uri: str) -> None:
    answer = request_error_of(error, "r1")
    assert (answer.status, answer.type, answer.requestId) == (status, type_uri, "r1")


def test_a_raw_problem_response_is_complete_http() -> None:
    raw = problem_response(Unauthorized("who?", "Basic"))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 401 Unauthorized"
    assert "Content-Type: application/problem+json" in lines and "WWW-Authenticate: Basic" in lines
    assert f"Content-Length: {len(body)}" in lines and json.loads(body)["detail"] == "who?"
