"""RFC 8620 §3.7 result references: an argument `#name` whose value is a ResultReference takes `name`'s value
from an earlier response of the same request, selected by a JSON Pointer (RFC 6901) that may use `*`.

Pure functions; no I/O here. `_walk` recurses once per pointer token but only while the referenced value
has that member, so its depth is bounded by the response's nesting, itself bounded by GATEWAY_MAX_JSON_DEPTH
(responses nest no deeper than the requests and stored data they come from).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.errors import MethodError
from gateway.jmap.types import Invocation


def _fail(description: str) -> MethodError:
    return MethodError("invalidResultReference", description)


def resolve_arguments(args: dict[str, Any], responses: Sequence[Invocation]) -> dict[str, Any]:
    """The arguments with every `#name` replaced by `name` and its referenced value."""
    if not any(key.startswith("#") for key in args):
        return args
    out: dict[str, Any] = {}
    for key, value in args.items():
        if not key.startswith("#"):
            out[key] = value
            continue
        plain = key[1:]
        if plain in args:
            # RFC 8620 §3.7: both forms of one argument is invalidArguments.
            raise MethodError("invalidArguments", f"The arguments have both {plain} and {key}.")
        out[plain] = evaluate(value, responses)
    return out


def evaluate(reference: Any, responses: Sequence[Invocation]) -> Any:
    if not isinstance(reference, dict) or not all(
            isinstance(reference.get(k), str) for k in ("resultOf", "name", "path")):
        raise _fail("A ResultReference is an object with string resultOf, name and path.")
    # RFC 8620 §3.7: the first earlier response with that method call id.
    found = next((r for r in responses if r[2] == reference["resultOf"]), None)
    if found is None:
        raise _fail(f"No earlier method call has the id {reference['resultOf']!r}.")
    name, arguments, _ = found
    if name != reference["name"]:
        raise _fail(f"The response to {reference['resultOf']!r} is {name!r}, not {reference['name']!r}.")
    path = reference["path"]
    if path == "":
        return arguments
    if not path.startswith("/"):
        raise _fail(f"The path {path!r} is not a JSON Pointer.")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
    return _walk(arguments, tokens, path)


def _walk(value: Any, tokens: list[str], path: str) -> Any:
    if not tokens:
        return value
    token, rest = tokens[0], tokens[1:]
    if isinstance(value, list):
        if token == "*":
            # RFC 8620 §3.7: apply the rest to every item; arrays that come back are flattened.
            out: list[Any] = []
            for item in value:
                result = _walk(item, rest, path)
                if isinstance(result, list):
                    out.extend(result)
                else:
                    out.append(result)
            return out
        if token.isdigit() and (token == "0" or not token.startswith("0")) and int(token) < len(value):
            return _walk(value[int(token)], rest, path)
    elif isinstance(value, dict) and token in value:
        return _walk(value[token], rest, path)
    raise _fail(f"The path {path!r} does not exist in the referenced response (at {token!r}).")
