"""The dashboard, in pieces and in a real browser."""
