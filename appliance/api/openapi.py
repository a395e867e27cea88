"""The OpenAPI document, completed in one place so that it states what the API really does.

FastAPI derives paths, parameters, bodies and success responses from the routes. What it cannot
see is added here, by rule, for every operation:

- the scope each operation needs, for a route that authenticates inline (the match routes, bulk
  enrolment) and so declares ``requires(scope)``; FastAPI itself lists the bearer scheme and scope
  of every route that depends on ``authorized(scope)`` (``appliance.api.deps``);
- the error responses, always ``application/problem+json`` (RFC 9457, one ``Problem`` schema):
  401/403 where a key is needed, 404 where the path names a resource, 413 where there is a body
  (and 400 where FastAPI parses it as JSON), 422 where anything is validated, 500/503 wherever a
  backing server is involved, plus whatever a route lists with ``problems(...)`` for errors its
  own logic raises;
- the headers: ``X-Request-Id`` on every response (and accepted on every request),
  ``WWW-Authenticate`` on 401, ``Retry-After`` on 503.

405 is not an operation's response; it is answered for any undeclared method with an ``Allow``
header (``appliance.api.problems``). ``tests/appliance/test_openapi_contract.py`` holds the
running appliance to this document with schemathesis.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder

from appliance.api.deps import BEARER
from appliance.api.problems import PROBLEM
from appliance.auth import Scope

_REF = "#/components/responses/"

# status -> (name under components/responses, description): every error the API sends, as problem+json.
_PROBLEMS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request is malformed in a way the schema cannot express"),
    401: ("Unauthorized", "No API key, or not a valid, unrevoked one"),
    403: ("Forbidden", "The API key lacks the scope this operation needs"),
    404: ("NotFound", "The resource named in the request does not exist"),
    409: ("Conflict", "The resource's state does not allow this now (e.g. it is being erased)"),
    410: ("Gone", "The subject was erased; its data is destroyed"),
    413: ("PayloadTooLarge", "The body passes the appliance's size cap"),
    415: ("UnsupportedMediaType", "The body's Content-Type is not one this operation accepts"),
    416: ("RangeNotSatisfiable", "The Range lies outside the content"),
    422: ("Unprocessable", "The request did not validate; `errors` lists where, never echoing the input"),
    500: ("InternalError", "An unexpected error; quote the request id"),
    503: ("ServiceUnavailable", "A backing server (PostgreSQL, Redis, S3, Vault) is down or the index is warming"),
}
_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {"description": "The request's id: the caller's `X-Request-Id` when it matches "
                     "`^[A-Za-z0-9._:-]{8,64}$`, else a new one. Logged and audited with the request.",
                     "required": True, "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "The scheme to authenticate with.", "required": True,
                         "schema": {"type": "string", "enum": ["Bearer"]}},
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                    "schema": {"type": "integer", "minimum": 0}},
}
_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document. Members beyond these may be added for a problem type "
    "(e.g. `line` and `lines_committed` for a bulk enrolment line that failed).",
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance", "request_id"],
    "properties": {
        "type": {"type": "string", "format": "uri", "description": "The problem type, a URI per kind of error."},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "The request path."},
        "request_id": {"type": ["string", "null"], "description": "Also the X-Request-Id response header."},
        "errors": {
            "type": "array",
            "description": "Validation errors (422): where and why, never the offending input.",
            "items": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
                "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                "msg": {"type": "string"},
                "type": {"type": "string"},
            }},
        },
    },
}
_REQUEST_ID_PARAMETER: dict[str, Any] = {
    "name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "Your id for this request, echoed in the response and the audit trail when it matches "
    "`^[A-Za-z0-9._:-]{8,64}$` (otherwise the appliance makes one).",
}


def requires(scope: Scope | None) -> dict[str, Any]:
    """``openapi_extra`` for a route that authenticates inline: the key it needs (None: any valid key)."""
    return {"security": [{BEARER.scheme_name: [scope.value] if scope is not None else []}]}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the errors a route's own logic raises; ``install`` turns each into a problem
    response (only its status matters here)."""
    return {code: {"description": _PROBLEMS[code][1]} for code in codes}


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that completes FastAPI's document (once; FastAPI caches it)."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    completed: list[dict[str, Any]] = []  # the document last completed (FastAPI remakes it if routes change)

    def openapi() -> dict[str, Any]:
        doc = generate()
        if not completed or completed[0] is not doc:
            complete(doc)
            completed[:] = [doc]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def complete(doc: dict[str, Any]) -> None:
    """Add the security scheme, problem responses and headers to FastAPI's document, in place."""
    components = doc.setdefault("components", {})
    components["securitySchemes"] = {
        BEARER.scheme_name: jsonable_encoder(BEARER.model, by_alias=True, exclude_none=True)}
    components.setdefault("schemas", {})["Problem"] = _PROBLEM_SCHEMA
    components["headers"] = _HEADERS
    components["parameters"] = {"RequestId": _REQUEST_ID_PARAMETER}
    components["responses"] = {name: _problem_response(status, text) for status, (name, text) in _PROBLEMS.items()}
    for operations in doc["paths"].values():
        for op in operations.values():
            _complete_operation(op)
    _drop_unused_schemas(doc, ("HTTPValidationError", "ValidationError"))


def _problem_response(status: int, description: str) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    if status == 401:
        headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
    if status == 503:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return {"description": description, "headers": headers,
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _complete_operation(op: dict[str, Any]) -> None:
    parameters = op.setdefault("parameters", [])
    responses = op["responses"]
    validates = bool(parameters) or "requestBody" in op
    if not validates:
        responses.pop("422", None)  # FastAPI's, for a hidden header (the API key) that cannot fail validation
    codes = {int(code) for code in responses if code[0] in "45"}
    if "security" in op:
        codes |= {401, 500, 503}
        if any(scopes for requirement in op["security"] for scopes in requirement.values()):
            codes.add(403)
    if any(p.get("in") == "path" for p in parameters):
        codes.add(404)
    if validates:
        codes.add(422)
    if "requestBody" in op:
        codes.add(413)
        if _parsed_by_fastapi(op["requestBody"]):
            codes.add(400)  # FastAPI's answer to a body that is not JSON at all
    parameters.append({"$ref": "#/components/parameters/RequestId"})
    for code in sorted(codes):
        own = responses.get(str(code), {})
        # Keep a response the route describes itself (readyz's 503 is a Readiness document), except
        # FastAPI's default 422, which is not what the API sends.
        if "content" not in own or code == 422:
            responses[str(code)] = {"$ref": _REF + _PROBLEMS[code][0]}
    for response in responses.values():
        if "$ref" not in response:
            response.setdefault("headers", {})["X-Request-Id"] = {"$ref": "#/components/headers/X-Request-Id"}
    op["responses"] = dict(sorted(responses.items()))


def _parsed_by_fastapi(body: dict[str, Any]) -> bool:
    """A body FastAPI parses for a pydantic parameter: JSON only, its schema a component. Routes that read
    their own bodies (raw float32, NDJSON, media) describe them inline and answer 415/422 themselves."""
    content = body.get("content", {})
    return list(content) == ["application/json"] and "$ref" in content["application/json"].get("schema", {})


def _drop_unused_schemas(doc: dict[str, Any], names: tuple[str, ...]) -> None:
    """Remove FastAPI's validation-error schemas once nothing refers to them (in order: the first refers
    to the second)."""
    schemas = doc["components"]["schemas"]
    for name in names:
        if name in schemas and f'"#/components/schemas/{name}"' not in json.dumps(doc):
            del schemas[name]
