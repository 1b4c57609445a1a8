"""GET /openapi.json: the API description, kept beside the routes it describes."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow import __version__
from meterflow.api.responses import json_response

ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR}}}
    if retry:
        out["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return out


ID = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[A-Za-z0-9_-]+$"}


def _op(summary: str, scope: str, ok: str = "200", body: str | None = None, params: list[str] | None = None,
        errors: tuple[str, ...] = ("400", "401", "403", "404")) -> dict[str, Any]:  # fmt: skip
    """One operation: its scope, body schema, query/path parameters and error answers."""
    op: dict[str, Any] = {"summary": summary, "description": f"Needs an API key with scope `{scope}` (or `admin`).",
                          "responses": {ok: {"description": "OK"}}}  # fmt: skip
    for code in errors:
        op["responses"][code] = _error({"400": "Invalid request; the message names the field.",
                                        "401": "Missing, unknown or revoked API key.",
                                        "403": "The key lacks the scope.", "404": "Not found.",
                                        "409": "Conflict."}[code])  # fmt: skip
    op["responses"]["429"] = _error("Rate limited.", retry=True)
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if params:
        op["parameters"] = [
            {"name": p.strip("{}"), "in": "path" if p.startswith("{") else "query", "required": p.startswith("{"),
             "schema": {"type": "string"}}
            for p in params
        ]  # fmt: skip
    return op


PAGE = ["limit", "cursor"]

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "MeterFlow",
        "version": __version__,
        "description": "Usage-based billing engine: idempotent ingestion of usage events.",
    },
    "paths": {
        "/v1/events": {
            "post": {
                "summary": "Ingest a batch of 1 to 1000 usage events",
                "description": "Idempotent on transaction_id. Per-event problems are listed in "
                "`failed` and never fail the whole batch.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}},
                },
                "responses": {
                    "200": {
                        "description": "received = accepted + duplicates + len(failed)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/IngestResult"}}},
                    },
                    "400": _error("Body is not JSON, or not an object with a non-empty `events` array."),
                    "413": _error("Body over the byte limit, or more than 1000 events."),
                    "415": _error("Content-Type is not application/json."),
                    "401": _error("Missing, unknown or revoked API key."),
                    "403": _error("The key lacks the `ingest` scope."),
                    "429": _error("Rate limited (requests or events per second).", retry=True),
                    "503": _error("A backing service is down or the queue is full.", retry=True),
                },
            }
        },
        "/v1/usage": {
            "get": _op(
                "Usage of one meter by one customer in [start, end)",
                "read",
                params=[
                    "customer_id",
                    "meter",
                    "metric",
                    "start",
                    "end",
                    "group_by",
                    "window",
                    "tz",
                    "filter[<property>]",
                ],
                errors=("400", "401", "403"),
            )
        },
        "/v1/meters": {
            "get": _op("List meters (cursor pagination)", "read", params=PAGE, errors=("400", "401", "403")),
            "post": _op("Create a meter", "admin", "201", "Meter", errors=("400", "401", "403", "409")),
        },
        "/v1/meters/{code}": {
            "get": _op("Get a meter", "read", params=["{code}"]),
            "put": _op(
                "Create or replace a meter (not one defined in the config)",
                "admin",
                "200",
                "Meter",
                ["{code}"],
                ("400", "401", "403", "409"),
            ),
            "delete": _op("Delete a meter", "admin", "204", params=["{code}"], errors=("401", "403", "404", "409")),
        },
        "/v1/customers": {
            "get": _op(
                "List customers (cursor pagination, name/email filters)",
                "read",
                params=[*PAGE, "name", "email"],
                errors=("400", "401", "403"),
            )
        },
        "/v1/customers/{customer_id}": {
            "get": _op("Get a customer", "read", params=["{customer_id}"]),
            "put": _op("Create or replace a customer", "admin", "200", "Customer", ["{customer_id}"]),
            "patch": _op("Change some fields of a customer", "admin", "200", "Customer", ["{customer_id}"]),
            "delete": _op("Delete a customer (soft: kept for past invoices)", "admin", "204", params=["{customer_id}"]),
        },
        "/v1/keys": {
            "get": _op("List API keys (never the secret)", "admin", params=PAGE, errors=("400", "401", "403")),
            "post": _op(
                "Create an API key; the secret is in this answer only",
                "admin",
                "201",
                "KeyRequest",
                errors=("400", "401", "403"),
            ),
        },
        "/v1/keys/{key_id}": {
            "delete": _op("Revoke an API key", "admin", "204", params=["{key_id}"], errors=("401", "403", "404"))
        },
        "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Alive"}}}},
        "/ready": {
            "get": {
                "summary": "Readiness: each backing service checked",
                "responses": {
                    "200": {"description": "Every backing service answers"},
                    "503": {"description": "At least one backing service is down; `checks` says which"},
                },
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Text format 0.0.4"}}}
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    },
    "security": [{"bearer": []}, {"apiKey": []}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        },
        "schemas": {
            "Meter": {
                "type": "object",
                "required": ["code", "event_type", "aggregation"],
                "properties": {
                    "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,62}$"},
                    "name": {"type": "string"},
                    "event_type": {"type": "string"},
                    "aggregation": {"enum": ["COUNT", "SUM", "MAX", "MIN", "AVG", "UNIQUE_COUNT", "LATEST"]},
                    "property": {"type": ["string", "null"], "description": "Required for all but COUNT."},
                    "unit": {"type": "string"},
                    "filters": {"type": "object", "description": "property: value or [values]"},
                    "group_by": {"type": "array", "items": {"type": "string"}},
                    "description": {"type": "string"},
                },
            },
            "Customer": {
                "type": "object",
                "properties": {
                    "name": {"type": ["string", "null"]},
                    "email": {"type": ["string", "null"]},
                    "currency": {"type": ["string", "null"], "description": "ISO 4217"},
                    "timezone": {"type": "string", "description": "IANA, for billing periods"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "KeyRequest": {
                "type": "object",
                "required": ["scope"],
                "properties": {
                    "scope": {"enum": ["ingest", "read", "admin"]},
                    "name": {"type": "string"},
                    "customer_id": {"type": "string", "description": "Binds an ingest key to one customer."},
                    "rate_limits": {
                        "type": "object",
                        "properties": {
                            k: {"type": "integer"}
                            for k in ("requests_per_s", "requests_burst", "events_per_s", "events_burst")
                        },
                    },
                },
            },
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "Event": {
                "type": "object",
                "additionalProperties": False,
                "required": ["transaction_id", "customer_id", "event_type", "timestamp"],
                "properties": {
                    "transaction_id": ID,
                    "customer_id": ID,
                    "event_type": {"type": "string", "minLength": 1, "maxLength": 100},
                    "timestamp": {
                        "type": "integer",
                        "description": "Unix epoch milliseconds; at most 5 minutes ahead, at most 30 days old.",
                    },
                    "properties": {
                        "type": "object",
                        "maxProperties": 100,
                        "additionalProperties": {
                            "oneOf": [{"type": "string", "maxLength": 1000}, {"type": "number"}, {"type": "boolean"}]
                        },
                    },
                },
            },
            "Batch": {
                "type": "object",
                "required": ["events"],
                "properties": {
                    "events": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1000,
                        "items": {"$ref": "#/components/schemas/Event"},
                    }
                },
            },
            "IngestResult": {
                "type": "object",
                "required": ["accepted", "duplicates", "failed"],
                "properties": {
                    "accepted": {"type": "integer"},
                    "duplicates": {"type": "integer"},
                    "failed": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["index", "transaction_id", "reason"],
                            "properties": {
                                "index": {"type": "integer"},
                                "transaction_id": {"type": ["string", "null"]},
                                "reason": {
                                    "type": "string",
                                    "description": "Stable machine code, e.g. timestamp_too_old, in_flight.",
                                },
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}


async def openapi(request: Request) -> Response:
    return json_response(SPEC)
