"""gRPC plumbing both ends of a call use (the client, the services, the gateway, the
tools); light enough for the client install.

- `channel`: client channels with the project's options; a wait for a health check.
- `tls`: TLS credentials of servers and channels.
- `bearer`: the API key on the wire (`authorization: Bearer <key>`).
- `errors`: one readable message for a failed call.
- `messages`: protocol enums to domain names (audio encodings).
- `infer_wire`: the inference reply without protobuf's copies of the mouths.

What only a server needs (servers, health, status codes, API-key checks) is in
`lipsync.serving`.
"""
