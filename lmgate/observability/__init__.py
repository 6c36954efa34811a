"""Observability: Prometheus metrics, one JSON log line per request, and their set-up."""

from lmgate.observability.logs import RequestLog, configure_logging
from lmgate.observability.metrics import Metrics
from lmgate.observability.multiprocess import cleanup_multiprocess_dir, prepare_multiprocess_dir

__all__ = [
    "Metrics",
    "RequestLog",
    "cleanup_multiprocess_dir",
    "configure_logging",
    "prepare_multiprocess_dir",
]
