"""gRPC plumbing shared by the services, the client and the tools.

- `channel`: client channels with the project's options; a wait for a health check.
- `serve`: servers, the standard health service, signal handling, logging, and the
  scaffold both services' `__main__` use.
- `errors`: one readable message for a failed call.
- `messages`: protocol enums to domain names (audio encodings).
- `infer_wire`: the inference reply without protobuf's copies of the mouths.
"""
