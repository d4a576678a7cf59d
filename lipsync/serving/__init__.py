"""What both services run on and nothing else does.

- `grpc_server`: servers with the project's options, health, and `run_service`, the
  scaffold behind both `__main__`s.
- `status_codes`: the gRPC status of the errors both services raise.
- `api_keys`, `auth_interceptor`: API keys and their limits, and the interceptor that
  checks them on the client port (docs/SECURITY.md).
- `store`: the bounded load-once store (model registry, frames store).
- `admission`: load shedding, readiness (docs/RELIABILITY.md).
- `request_checks`: the request checks both services make, in one style.
- `metrics`, `logs`, `tracing`, `observability`: what operators see, and the gRPC
  interceptor that feeds them (docs/OPERATIONS.md).
"""
