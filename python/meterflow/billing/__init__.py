"""Billing: plans (rate cards), billing periods and the pure pricing of a period's usage."""
