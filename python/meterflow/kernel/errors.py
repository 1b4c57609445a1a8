"""Errors: invalid input that names its culprit, and the one table of the codes an answer carries."""

from __future__ import annotations


class CommandFailed(Exception):
    """A `meterflow` command's work failed for a reason it expects (a backend down, a bad archive); the
    text says what failed and why."""

    def __init__(self, message: str, after_progress: bool = False) -> None:
        super().__init__(message)
        self.after_progress = after_progress  # a progress line was being written: start a new line


class FieldError(ValueError):
    """`field` names what is wrong; `message` is one sentence for people."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# Every error code an HTTP answer carries, with its status (`{"error": <code>, "message": <sentence>}`).
# A code not listed here cannot be raised; the Rust core's own codes for a refused batch answer 400
# unless listed.
STATUS: dict[str, int] = {
    # 400
    "invalid_content_length": 400,
    "invalid_credit_note": 400,
    "invalid_customer": 400,
    "invalid_customer_id": 400,
    "invalid_json": 400,
    "invalid_key": 400,
    "invalid_meter": 400,
    "invalid_parameter": 400,
    "invalid_plan": 400,
    "invalid_subscription": 400,
    "invalid_value": 400,
    "invalid_webhook": 400,
    # 401
    "invalid_api_key": 401,
    "missing_api_key": 401,
    # 403
    "insufficient_scope": 403,
    "other_customer": 403,
    # 404
    "credit_note_not_found": 404,
    "customer_not_found": 404,
    "invoice_not_found": 404,
    "key_not_found": 404,
    "meter_not_found": 404,
    "no_active_subscription": 404,
    "plan_not_found": 404,
    "subscription_not_found": 404,
    "webhook_not_found": 404,
    # 404
    "not_found": 404,
    # 405
    "method_not_allowed": 405,
    # 408
    "body_timeout": 408,
    # 409
    "conflict": 409,
    "credit_exceeds_invoice": 409,
    "invalid_status": 409,
    "meter_exists": 409,
    "meter_in_use": 409,
    "meter_read_only": 409,
    "plan_exists": 409,
    "plan_not_priceable": 409,
    "plan_read_only": 409,
    # 409
    "subscription_conflict": 409,
    "subscription_ended": 409,
    # 412
    "precondition_failed": 412,
    # 413
    "body_too_large": 413,
    # 413
    "too_many_events": 413,
    # 415
    "unsupported_media_type": 415,
    # 422
    "events_query_too_expensive": 422,
    "usage_out_of_range": 422,
    "usage_query_too_expensive": 422,
    # 429
    "rate_limited": 429,
    "too_many_auth_failures": 429,
    # 500
    "internal_error": 500,
    # 503
    "dedup_unavailable": 503,
    "records_unavailable": 503,
    "storage_unavailable": 503,
    # 503
    "archive_spool_full": 503,
    "overloaded": 503,
}
DECODE_STATUS = 400  # a batch the Rust core refuses, by a code of its own

# The codes whose sentence is always the same.
SENTENCE: dict[str, str] = {
    "missing_api_key": "Send an API key as `Authorization: Bearer <key>` or `X-API-Key`.",
    "invalid_api_key": "The API key is unknown or revoked.",
    "precondition_failed": "If-Match names a version that is not the record's current one; read it again and retry.",
    "conflict": "The change conflicts with another record; read it again and retry.",
    "invalid_value": "A value in the request cannot be stored; check its text fields.",
    "internal_error": "MeterFlow failed to handle this request; it has been logged.",
}


def status_of(code: str) -> int:
    """The HTTP status of an error code (the table above; a code of the Rust core's decoder: 400)."""
    return STATUS.get(code, DECODE_STATUS)
