"""Metering: meters say which events count and how; usage and event queries apply them to storage.

Owns: meter definitions and their versions (`meters`, `catalog`), typed usage and event queries and their
SQL (`usage`, `events`, `windows`, `gauge`).
Does not own: HTTP parameters (parsed at the edge, in `api`), the calendar and clock (`kernel`), prices
(`billing`), nor the storage engines (`storage`).
"""
