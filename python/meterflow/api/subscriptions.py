"""/v1/subscriptions: put a customer on a plan from a date, cancel, change plan; and the upcoming invoice."""

from __future__ import annotations

from decimal import Decimal, localcontext
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, Param, operation
from meterflow.billing.catalog import StoredPlanBroken
from meterflow.billing.closing import Closer
from meterflow.billing.preview import billing_context, price_service_period
from meterflow.billing.render import priced_period_json
from meterflow.billing.subscriptions import Subscription, SubscriptionConflict, SubscriptionError, Subscriptions
from meterflow.kernel.clock import now_ms
from meterflow.kernel.ids import ID_RE, ID_RULE
from meterflow.kernel.money import EXACT, money_text
from meterflow.kernel.params import EPOCH_MS_MAX, EPOCH_MS_MIN
from meterflow.metering.usage import UsageOutOfRange
from meterflow.storage.base import QueryLimitExceeded
from meterflow.web.errors import ApiError, or_not_found
from meterflow.web.pagination import page_params, page_response
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of


def _store(request: Request) -> Subscriptions:
    return runtime_of(request).subscriptions



def _answer(sub: Subscription, status: int = 200) -> Response:
    return json_response(sub.as_json(now_ms()), status)


def _object(doc: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ApiError("invalid_subscription", "The body must be a JSON object.")
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise ApiError("invalid_subscription", f"`{unknown[0]}` is not a field here; the fields are "
                       f"{', '.join(fields)}.")  # fmt: skip
    return doc


def _instant(doc: dict[str, Any], name: str, default: int | None = None) -> int:
    v = doc.get(name)
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not EPOCH_MS_MIN <= v <= EPOCH_MS_MAX:
        raise ApiError("invalid_subscription", f"`{name}` must be epoch milliseconds from {EPOCH_MS_MIN} to "
                       f"{EPOCH_MS_MAX}, got {str(v)[:40]!r}.")  # fmt: skip
    return v


def _fail(e: SubscriptionError | SubscriptionConflict) -> ApiError:
    if isinstance(e, SubscriptionConflict):
        return ApiError(e.code, str(e))
    return ApiError("invalid_subscription", e.message)


def _sub_id(request: Request) -> str:
    return str(request.path_params["subscription_id"])


@operation("Subscribe a customer to a plan from `start`", {
    201: "Created", 409: "The customer has a subscription to this plan that overlaps (`subscription_conflict`), or "
    "the plan's current version prices a meter that no longer exists (`plan_not_priceable`)."},
    body="SubscriptionRequest", result="Subscription")  # fmt: skip
async def create_subscription(request: Request) -> Response:
    doc = _object(await json_body(request), ("customer_id", "plan", "start"))
    customer = doc.get("customer_id")
    if not isinstance(customer, str) or not ID_RE.fullmatch(customer):
        raise ApiError("invalid_subscription", f"`customer_id` is required: {ID_RULE}.")
    try:
        sub = await _store(request).create(customer, doc.get("plan"), _instant(doc, "start", now_ms()))  # type: ignore[arg-type]
    except (SubscriptionError, SubscriptionConflict) as e:
        raise _fail(e) from None
    except StoredPlanBroken as e:
        raise ApiError("plan_not_priceable", str(e)) from None
    return _answer(sub, 201)


@operation("List subscriptions, in id order", {200: "A page of subscriptions", 400: "A parameter is invalid."},
           result="Page", params=(*PAGE, Param("customer_id", "Only this customer's subscriptions.")))  # fmt: skip
async def list_subscriptions(request: Request) -> Response:
    limit, cursor = page_params(request)
    customer = request.query_params.get("customer_id")
    if customer is not None and not ID_RE.fullmatch(customer):
        raise ApiError("invalid_parameter", f"`customer_id` must be {ID_RULE}.")
    rows = await _store(request).page(customer, cursor, limit + 1)
    now = now_ms()
    return page_response(rows, limit, lambda s: s.id, lambda s: s.as_json(now))


@operation("Get a subscription", {200: "The subscription", 404: "There is no such subscription."},
           result="Subscription")  # fmt: skip
async def get_subscription(request: Request) -> Response:
    sid = _sub_id(request)
    sub = or_not_found(await _store(request).get(sid), "subscription_not_found", f"There is no subscription {sid!r}.")
    return _answer(sub)


@operation("Cancel a subscription at `at` (default now)", {
    200: "Cancelled", 404: "There is no such subscription.", 409: "The subscription ends before `at` already."},
    body="CancelRequest", result="Subscription")  # fmt: skip
async def cancel_subscription(request: Request) -> Response:
    doc = _object(await json_body(request), ("at",))
    try:
        sub = await _store(request).cancel(_sub_id(request), _instant(doc, "at", now_ms()))
    except (SubscriptionError, SubscriptionConflict) as e:
        raise _fail(e) from None
    if sub is None:
        raise ApiError("subscription_not_found", f"There is no subscription {_sub_id(request)!r}.")
    return _answer(sub)


@operation("Move a subscription to another plan at `at` (default now): the old plan bills up to `at`", {
    200: "Changed: `ended` is this subscription, `subscription` the new one", 404: "There is no such subscription.",
    409: "The subscription ends before `at`, or the new plan overlaps another subscription to it."},
    body="ChangeRequest", result="PlanChange")  # fmt: skip
async def change_subscription(request: Request) -> Response:
    doc = _object(await json_body(request), ("plan", "at"))
    try:
        done = await _store(request).change(_sub_id(request), doc.get("plan"), _instant(doc, "at", now_ms()))  # type: ignore[arg-type]
    except (SubscriptionError, SubscriptionConflict) as e:
        raise _fail(e) from None
    if done is None:
        raise ApiError("subscription_not_found", f"There is no subscription {_sub_id(request)!r}.")
    now = now_ms()
    return json_response({"ended": done[0].as_json(now), "subscription": done[1].as_json(now)})


@operation("The customer's current period so far, priced", {
    200: "The upcoming invoice", 400: "The customer id or `subscription_id` is invalid, or the customer has several "
    "active subscriptions and `subscription_id` does not name one of them.",
    404: "The customer has no active subscription.",
    422: "A usage value is outside the exact range, a usage query went over its limits, or the plan version "
         "prices a meter that no longer exists."},
    result="UpcomingInvoice",
    params=(Param("subscription_id", "Which active subscription (when several)."),))  # fmt: skip
async def upcoming_invoice(request: Request) -> Response:
    rt = runtime_of(request)
    cid = str(request.path_params["customer_id"])
    if not ID_RE.fullmatch(cid):
        raise ApiError("invalid_customer_id", f"A customer id is {ID_RULE}.")
    now = now_ms()
    active = [s for s in await rt.subscriptions.of_customer(cid) if s.active_at(now)]
    wanted = request.query_params.get("subscription_id")
    if wanted is not None:
        active = [s for s in active if s.id == wanted]
        if not active:
            raise ApiError("invalid_parameter", f"`subscription_id` {wanted[:60]!r} is not an active "
                           f"subscription of customer {cid!r}.")  # fmt: skip
    if not active:
        raise ApiError("no_active_subscription", f"Customer {cid!r} has no active subscription.")
    if len(active) > 1:
        ids = ", ".join(s.id for s in active)
        raise ApiError("invalid_parameter", f"Customer {cid!r} has {len(active)} active subscriptions ({ids}); "
                       "name one in `subscription_id`.")  # fmt: skip
    sub = active[0]
    try:
        ctx = await billing_context(rt, sub)
        priced = await price_service_period(rt, ctx, ctx.period_at(now))
        # What finalized periods newly owe, to be billed on this subscription's next invoice.
        pending = await Closer(rt).late_lines(sub, priced.currency, now)
    except UsageOutOfRange as e:
        raise ApiError("usage_out_of_range", e.message) from None
    except QueryLimitExceeded:
        raise ApiError("usage_query_too_expensive", "A usage query of this period went over its limits "
                       "(MF_USAGE_MAX_*).") from None  # fmt: skip
    except StoredPlanBroken as e:
        # 422 here (the period cannot be priced), 409 when subscribing (the plan conflicts with the catalog).
        raise ApiError("plan_not_priceable", str(e), status=422) from None
    with localcontext(EXACT):
        late = sum((Decimal(ln["amount"]) for ln in pending), Decimal(0))
    return json_response({"customer_id": cid, "subscription_id": sub.id, "plan_version": sub.plan_version,
                          **priced_period_json(priced), "pending_late_lines": pending,
                          "pending_late_usage": money_text(late, priced.currency)})  # fmt: skip
