"""Settings: defaults, files, environment and flags."""
