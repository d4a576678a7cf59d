"""What both services run on and nothing else does: the bounded load-once store
(`store.py`), admission and load shedding (`admission.py`), request checks
(`request_checks.py`), and what operators see: metrics, logs, traces and the gRPC
interceptor that feeds them (`metrics.py`, `logs.py`, `tracing.py`, `observability.py`;
docs/OPERATIONS.md)."""
