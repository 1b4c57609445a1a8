"""Auth: API keys (hashed, scoped, revocable) and per-key rate limits."""
