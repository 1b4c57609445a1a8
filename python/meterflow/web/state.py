"""The typed state a route reads: the worker's runtime, as the app's lifespan stored it."""

from __future__ import annotations

from starlette.requests import Request

from meterflow.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    """The worker's runtime, as the lifespan stored it."""
    rt = request.app.state.runtime
    assert isinstance(rt, Runtime)
    return rt
