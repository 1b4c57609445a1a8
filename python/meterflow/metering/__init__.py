"""Metering: meters say which events count and how; usage queries apply them."""
