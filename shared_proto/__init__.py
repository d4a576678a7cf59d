"""Protocol definitions shared by the services and their clients.

`common.proto` (messages both APIs use), `compositing.proto` (the client API, port 50052)
and `inference.proto` (internal, port 50051). Their stubs (`common_pb2`,
`compositing_pb2`, `compositing_pb2_grpc`, `inference_pb2`, ...) are generated into this
folder as top-level modules, the names existing clients import with this folder on
PYTHONPATH: by `make setup` in the source tree and by the wheel build in an install
(`scripts/gen_proto.py`). Code inside this project imports them through `lipsync.proto`.
"""
