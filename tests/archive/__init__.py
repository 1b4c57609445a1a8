"""The raw-event archive: exactly once, the spool, replay."""
