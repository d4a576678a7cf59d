"""Protocol definitions shared by the services and their clients.

`make setup` generates `compositing_pb2`, `compositing_pb2_grpc`, `inference_pb2`
and `inference_pb2_grpc` into this folder as top-level modules (the names existing
clients import with this folder on PYTHONPATH). Code inside this project imports
them through `lipsync.proto`.
"""
