"""GET /openapi.json: the API description, derived from the routes and the settings so it cannot drift.

Each endpoint carries its own documentation (`@operation(...)` next to it); the
scope comes from `requires`, path parameters from the route, limits from the
settings. Answers every guarded route shares (401, 403, 429, 503) and every
JSON-body route shares (400, 413, 415) are added here, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from meterflow import __version__
from meterflow.auth.keys import SCOPES
from meterflow.billing.credit_notes import REASONS
from meterflow.billing.invoices import STATUSES as INVOICE_STATUSES
from meterflow.billing.invoices import Kind
from meterflow.billing.plans import INTERVALS
from meterflow.billing.subscriptions import STATUSES as SUBSCRIPTION_STATUSES
from meterflow.billing.webhooks import CREDIT_NOTE_SUMMARY, EVENTS, INVOICE_SUMMARY
from meterflow.config import Settings
from meterflow.kernel.ids import ID_RE
from meterflow.kernel.params import EPOCH_MS_MAX, EPOCH_MS_MIN
from meterflow.kernel.rust import Limits
from meterflow.metering.meters import AGGREGATIONS
from meterflow.web.pagination import PAGE_MAX
from meterflow.web.responses import ADMIN_BODY_MAX, json_response
from meterflow.web.state import runtime_of

E = TypeVar("E", bound=Callable[..., Any])
ATTR = "openapi_operation"
RETRY = {429, 503}


@dataclass(frozen=True)
class Param:
    """A query parameter."""

    name: str
    description: str
    required: bool = False
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Operation:
    """What a route does and what it answers, beside the shared answers added by `spec`."""

    summary: str
    responses: Mapping[int, str]
    body: str | None = None  # a schema in components; the route reads it with `json_body`
    result: str | None = None  # the schema of its 2xx JSON answer
    params: tuple[Param, ...] = ()
    media_type: str = "application/json"


def operation(
    summary: str,
    responses: Mapping[int, str],
    *,
    body: str | None = None,
    result: str | None = None,
    params: Iterable[Param] = (),
    media_type: str = "application/json",
) -> Callable[[E], E]:
    """Documents the endpoint it decorates; `spec` refuses a route whose endpoint has none."""

    def mark(endpoint: E) -> E:
        setattr(endpoint, ATTR, Operation(summary, dict(responses), body, result, tuple(params), media_type))
        return endpoint

    return mark


PAGE = (
    Param(
        "limit",
        f"Page size, 1 to {PAGE_MAX} (default 100).",
        schema={"type": "integer", "minimum": 1, "maximum": PAGE_MAX},
    ),
    Param("cursor", "The `next_cursor` of the previous page."),
)

GUARDED = {
    401: "Missing, unknown or revoked API key.",
    403: "The key lacks the scope this route needs.",
    429: "Rate limited (this key's requests, or failed keys from this address); retry after `Retry-After` s.",
    503: "Storage (`storage_unavailable`) or the records database (`records_unavailable`) is unavailable; "
    "retry after `Retry-After` seconds.",
}
# The answer of a change whose `If-Match` is stale (records/versions.py).
STALE = {412: "`If-Match` names a version that is not the record's current one; nothing changed."}
JSON_BODY = {
    400: "The body is not JSON, or a field is invalid; the message names it.",
    413: "The body is over the byte limit.",
    415: "Content-Type is not application/json.",
}


def _response(status: int, description: str, op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if status >= 400:
        out["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    elif status not in (204, 304):  # those two have no body
        if op.result:
            schema: dict[str, Any] = {"$ref": f"#/components/schemas/{op.result}"}
        else:
            schema = {"type": "string" if op.media_type.startswith("text/") else "object"}
        out["content"] = {op.media_type: {"schema": schema}}
    if status in RETRY:
        out["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return out


def _operation(route: Route, endpoint: Callable[..., Any], settings: Settings) -> dict[str, Any]:
    op: Operation | None = getattr(endpoint, ATTR, None)
    if op is None:
        raise LookupError(f"route {route.path} ({endpoint.__name__}) has no @operation documentation")
    scope: str | None = getattr(endpoint, "scope", None)
    responses: dict[int, str] = {}
    late = {408: f"The body did not arrive within {settings.http_body_timeout_s} s."}
    if op.body == "Batch":
        too_large = f"The body is over {settings.max_body_bytes} bytes or holds over {settings.max_events} events."
        responses |= {**JSON_BODY, **late, 413: too_large}
    elif op.body:
        responses |= {**JSON_BODY, **late, 413: f"The body is over the limit of {ADMIN_BODY_MAX} bytes."}
    if scope:
        responses |= GUARDED
    responses |= op.responses
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": endpoint.__name__,
        "responses": {str(s): _response(s, d, op) for s, d in sorted(responses.items())},
        "security": [{"bearer": []}, {"apiKey": []}] if scope else [],
    }
    if scope:
        out["description"] = f"Needs an API key with scope `{scope}` (or `admin`)."
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        for n in re.findall(r"{(\w+)", route.path)
    ]
    params += [
        {"name": p.name, "in": "query", "required": p.required, "description": p.description, "schema": dict(p.schema)}
        for p in op.params
    ]
    if params:
        out["parameters"] = params
    if op.body:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.body}"}}},
        }
    return out


def spec(routes: Iterable[BaseRoute], settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`; a LookupError names a route without documentation."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if isinstance(route, Mount) and route.path == "/dashboard":
            continue  # HTML pages for people, not the API
        if not isinstance(route, Route):
            raise LookupError(f"{route!r} is not a documented Route")
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(route.path, {})[method.lower()] = _operation(route, route.endpoint, settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MeterFlow",
            "version": __version__,
            "description": "Usage-based billing engine: idempotent ingestion of usage events.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": schemas(settings),
        },
        "webhooks": {
            event: {
                "post": {
                    "summary": f"`{event}`, sent to each receiver registered for it (Standard Webhooks: "
                    "webhook-id, webhook-timestamp and webhook-signature headers)",
                    "requestBody": {"content": {"application/json": {"schema": EVENT_REF}}},
                    "responses": {
                        "2XX": {"description": "Delivered; any other answer, a timeout or a refused address is "
                                "retried with backoff."}
                    },
                }
            }
            for event in EVENTS
        },
    }


# The event contract's limits as the core is built with them (ingest/service.py leaves these at the core's own).
CORE = Limits()
ID = {"type": "string", "minLength": 1, "maxLength": CORE.max_id_len, "pattern": f"^{ID_RE.pattern}$"}
OBJECT = {"type": "object"}
EVENT_REF = {"$ref": "#/components/schemas/WebhookEvent"}


def _summary(fields: tuple[str, ...], description: str, links: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "line_count", "links"],
        "description": description + " Amounts are decimal strings; links are paths under the API's base URL.",
        "properties": {
            **{f: {} for f in fields},
            "line_count": {"type": "integer", "minimum": 0, "description": "How many lines the document has."},
            "links": {"type": "object", "required": list(links), "properties": {k: {"type": "string"} for k in links}},
        },
    }


def schemas(settings: Settings) -> dict[str, Any]:
    ahead_min, age_days = settings.max_future_ms / 60_000, settings.max_age_ms / 86_400_000
    return {
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
                "event_type": {"type": "string", "minLength": 1, "maxLength": CORE.max_event_type_len},
                "timestamp": {
                    "type": "integer",
                    "description": f"Unix epoch milliseconds; at most {ahead_min:g} "
                    f"minutes ahead and at most {age_days:g} days old.",
                },
                "properties": {
                    "type": "object",
                    "maxProperties": CORE.max_properties,
                    "propertyNames": {"maxLength": CORE.max_property_key_len},
                    "additionalProperties": {
                        "oneOf": [
                            {"type": "string", "maxLength": CORE.max_property_value_len},
                            {"type": "number"},
                            {"type": "boolean"},
                        ]
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
                    "maxItems": settings.max_events,
                    "items": {"$ref": "#/components/schemas/Event"},
                }
            },
        },
        "IngestResult": {
            "type": "object",
            "required": ["accepted", "duplicates", "failed"],
            "description": "received = accepted + duplicates + len(failed)",
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
                            "reason": {"type": "string", "description": "A stable machine code."},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Meter": {
            "type": "object",
            "required": ["code", "event_type", "aggregation"],
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,62}$"},
                "name": {"type": "string"},
                "event_type": {"type": "string"},
                "aggregation": {"enum": list(AGGREGATIONS)},
                "property": {"type": ["string", "null"], "description": "Required for all but COUNT."},
                "unit": {"type": "string"},
                "filters": {"type": "object", "description": "property: value or [values]"},
                "group_by": {"type": "array", "items": {"type": "string"}},
                "description": {"type": "string"},
                "effective_at": {
                    "type": "integer",
                    "minimum": EPOCH_MS_MIN,
                    "maximum": EPOCH_MS_MAX,
                    "description": "Request only: epoch ms from which this definition is in force (default now).",
                },
            },
        },
        "Customer": {
            "type": "object",
            "properties": {
                "name": {"type": ["string", "null"], "maxLength": 500},
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
                "scope": {"enum": list(SCOPES)},
                "name": {"type": "string"},
                "customer_id": {**ID, "description": "Binds an ingest key to one customer."},
                "rate_limits": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        k: {"type": "integer", "minimum": 1}
                        for k in ("requests_per_s", "requests_burst", "events_per_s", "events_burst")
                    },
                },
            },
        },
        "WebhookRequest": {
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "events": {"type": "array", "items": {"enum": list(EVENTS)}},
                "description": {"type": "string", "maxLength": 500},
            },
        },
        "Webhook": {
            "type": "object",
            "required": ["id", "url", "events"],
            "properties": {
                "id": {"type": "string"},
                "url": {"type": "string"},
                "events": {"type": "array", "items": {"type": "string"}},
                "secret": {"type": "string", "description": "whsec_...; only in the answer that registers it."},
            },
        },
        "WebhookEvent": {
            "type": "object",
            "required": ["type", "timestamp", "data"],
            "description": "A webhook's body: the summary of the invoice or credit note and links to it, never "
            "its lines (read them from `links.self` with an API key).",
            "properties": {
                "type": {"enum": list(EVENTS)},
                "timestamp": {"type": "string", "format": "date-time"},
                "data": {
                    "oneOf": [{"$ref": "#/components/schemas/InvoiceSummary"},
                              {"$ref": "#/components/schemas/CreditNoteSummary"}]
                },
            },
        },
        "InvoiceSummary": _summary(
            INVOICE_SUMMARY, "invoice.finalized, invoice.voided and invoice.paid: the invoice's fields but `lines`.",
            links=("self", "html", "pdf"),
        ),
        "CreditNoteSummary": _summary(
            CREDIT_NOTE_SUMMARY, "credit_note.created: the credit note's fields but `lines`.",
            links=("self", "html", "pdf", "invoice"),
        ),
        "Invoice": {
            "type": "object",
            "required": ["id", "number", "status", "customer_id", "currency", "lines", "total"],
            "description": "The upcoming invoice's shape plus id, number (MF-YYYY-NNNNNN once finalized), "
            "status and dates. Amounts are decimal strings.",
            "properties": {
                "id": {"type": "string"},
                "number": {"type": ["string", "null"]},
                "status": {"enum": list(INVOICE_STATUSES)},
                "customer_id": {"type": "string"},
                "currency": {"type": "string"},
                "lines": {"type": "array", "items": OBJECT},
                "subtotal": {"type": "string"},
                "minimum_adjustment": {"type": "string"},
                "total": {"type": "string"},
                "kind": {"enum": list(get_args(Kind)), "description": "late: late lines only, of ended subscriptions"},
                "amount_credited": {"type": "string", "description": "The sum of the invoice's credit notes."},
                "amount_due": {"type": "string", "description": "total - amount_credited"},
                "issued_at": {"type": ["integer", "null"]},
                "due_at": {"type": ["integer", "null"]},
            },
        },
        "CreditNoteRequest": {
            "type": "object",
            "properties": {
                "amount": {"type": "string", "description": "Decimal string; default: all that is left to credit."},
                "memo": {"type": "string", "maxLength": 1000},
            },
        },
        "CreditNote": {
            "type": "object",
            "required": ["id", "number", "invoice_id", "customer_id", "reason", "currency", "total", "lines"],
            "description": "What is no longer owed on a finalized invoice (CN-YYYY-NNNNNN, gapless per year). Each "
            "line names the invoice line it credits (`invoice_line`: its position, null for the minimum adjustment; "
            "`line_key`; `late_for` for a late line). Amounts are decimal strings.",
            "properties": {
                "id": {"type": "string", "pattern": "^cn_[0-9a-f]{24}$"},
                "number": {"type": "string"},
                "invoice_id": {"type": "string"},
                "invoice_number": {"type": "string"},
                "customer_id": {"type": "string"},
                "subscription_id": {"type": "string"},
                "reason": {"enum": list(REASONS)},
                "currency": {"type": "string"},
                "total": {"type": "string"},
                "memo": {"type": "string"},
                "lines": {"type": "array", "items": OBJECT},
                "created_at": {"type": "integer"},
            },
        },
        "Page": {
            "type": "object",
            "required": ["data", "next_cursor"],
            "properties": {"data": {"type": "array", "items": OBJECT}, "next_cursor": {"type": ["string", "null"]}},
        },
        "Plan": {
            "type": "object",
            "required": ["code", "currency", "charges"],
            "description": "Amounts and quantities are decimal strings. Charge types: flat, unit, graduated, "
            "volume, package; a usage charge may price each value of a group-by property (`price_by`, `prices`, "
            "`default`).",
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,62}$"},
                "name": {"type": "string"},
                "description": {"type": "string"},
                "currency": {"type": "string", "description": "ISO 4217"},
                "interval": {"enum": list(INTERVALS)},
                "minimum": {"type": "string"},
                "charges": {"type": "array", "items": OBJECT},
            },
        },
        "Subscription": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "customer_id": ID,
                "plan": {"type": "string"},
                "plan_version": {"type": "integer"},
                "start": {"type": "integer"},
                "end": {"type": ["integer", "null"]},
                "status": {"enum": list(SUBSCRIPTION_STATUSES)},
            },
        },
        "SubscriptionRequest": {
            "type": "object",
            "required": ["customer_id", "plan"],
            "properties": {
                "customer_id": ID,
                "plan": {"type": "string"},
                "start": {"type": "integer", "description": "Epoch ms; default now."},
            },
        },
        "CancelRequest": {"type": "object", "properties": {"at": {"type": "integer", "description": "Default now."}}},
        "ChangeRequest": {
            "type": "object",
            "required": ["plan"],
            "properties": {"plan": {"type": "string"}, "at": {"type": "integer", "description": "Default now."}},
        },
        "PlanChange": {
            "type": "object",
            "properties": {
                "ended": {"$ref": "#/components/schemas/Subscription"},
                "subscription": {"$ref": "#/components/schemas/Subscription"},
            },
        },
        "UpcomingInvoice": {
            "type": "object",
            "required": [
                "customer_id",
                "subscription_id",
                "plan",
                "currency",
                "period",
                "lines",
                "subtotal",
                "minimum_adjustment",
                "total",
            ],
            "description": "Money and quantities are decimal strings; each line is rounded to the currency's minor "
            "unit half up, the subtotal is their sum, a minimum tops it up.",
            "properties": {
                "lines": {"type": "array", "items": OBJECT}, "period": OBJECT, "billing_period": OBJECT,
                "pending_late_lines": {"type": "array", "items": OBJECT, "description": "What finalized periods "
                                       "newly owe, to be billed on this subscription's next invoice."},
                "pending_late_usage": {"type": "string", "description": "The sum of `pending_late_lines`."},
            },
        },
        "Usage": {
            "type": "object",
            "required": ["customer_id", "meter", "period", "value", "aggregation"],
            "description": f"Values are exact decimal numbers. At most {settings.usage_max_windows} windows and "
            f"{settings.usage_max_period_days} days per query.",
            "properties": {
                "value": {"type": "number"},
                "breakdown": OBJECT,
                "series": {"type": "array", "items": OBJECT},
            },
        },
    }


@operation("This document", {200: "OpenAPI 3.1"})
async def openapi(request: Request) -> Response:
    return json_response(spec(request.app.routes, runtime_of(request).settings))
