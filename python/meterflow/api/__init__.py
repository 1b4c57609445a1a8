"""The HTTP API: Starlette routes mapping requests to the ingest and query stages."""
