"""Metering: usage queries against references, versioned meters, reading events, bounded reads."""
