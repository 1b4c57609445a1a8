"""The HTTP API as a client sees it: answers, bad input, OpenAPI, the fast path, connections, /metrics."""
