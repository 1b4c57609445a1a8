"""The test harness: real services in subprocesses, MeterFlow itself, the backends a test runs on, HTTP helpers.

Imported as `tests.harness.*` from the repository root (pytest's `pythonpath = ["."]`; scripts run with `-m`).
"""
