"""MeterFlow: a usage-based billing engine."""

from meterflow.config import ConfigError, Settings

__version__ = "0.1.0"

__all__ = ["ConfigError", "Settings", "__version__"]
