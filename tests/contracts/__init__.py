"""The suites every backend passes: storage, dedup, archive stores and rate limiters, over parametrized fixtures."""
