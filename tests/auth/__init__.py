"""API keys, scopes, rate limits and failed authentication."""
