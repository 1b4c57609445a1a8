"""The HTTP API under /v1: one module per resource, each mapping requests to a domain's service and its
answers to JSON, with the OpenAPI document derived from the routes (`openapi`).

Owns: the routes' parameters, the resources' JSON shapes and their documentation.
Does not own: what is shared with the dashboard (`web`: the key guard, bodies, errors, pages of a list,
documents), the rules of any domain (ingest, metering, billing), nor the wiring (`runtime`); it never
imports the dashboard.
"""
