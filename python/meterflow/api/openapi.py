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
                    "503": _error("A backing service is down or the queue is full.", retry=True),
                },
            }
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
    "components": {
        "schemas": {
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
                    "events": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"$ref": "#/components/schemas/Event"}}
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
                                "reason": {"type": "string", "description": "Stable machine code, e.g. timestamp_too_old, in_flight."},
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            },
        }
    },
}


async def openapi(request: Request) -> Response:
    return json_response(SPEC)
