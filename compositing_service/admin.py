"""Model admin of the compositing service: the avatars it knows, loading and unloading
an avatar in both services (its frames here, its networks in the inference service),
statistics and health. Returns protocol messages; errors are raised for the servicer's
one error mapping."""

from __future__ import annotations

import time

import grpc

from compositing_service.frames import FrameStore
from compositing_service.inference_client import InferenceClient
from lipsync import __version__
from lipsync.avatars.package import AvatarCatalog, check_model_id
from lipsync.proto import common_pb2 as common
from lipsync.proto import compositing_pb2 as cpb


class ModelAdmin:
    def __init__(self, catalog: AvatarCatalog, frames: FrameStore, inference: InferenceClient):
        self.catalog = catalog
        self.frames = frames
        self.inference = inference

    def known(self, model_id: str) -> str:
        """`model_id` if an avatar of that name is served; else UnknownModelError."""
        check_model_id(model_id)
        self.catalog.get(model_id)
        return model_id

    def health(self) -> cpb.HealthResponse:
        inference_ok = self.inference.healthy()
        loaded = max_models = 0
        if inference_ok:
            try:
                stats = self.inference.model_stats(timeout_s=2.0)
                loaded, max_models = stats.loaded_models, stats.max_models
            except grpc.RpcError:
                inference_ok = False
        return cpb.HealthResponse(
            healthy=True,
            loaded_models=loaded,
            max_models=max_models,
            inference_server_url=self.inference.address,
            inference_server_healthy=inference_ok,
            version=__version__,
        )

    def list_models(self) -> common.ListModelsResponse:
        self.catalog.rescan()
        try:
            loaded = {m.model_id for m in self.inference.list_models().models if m.loaded}
        except grpc.RpcError:
            loaded = set()
        out = []
        for name in self.catalog.names():
            info = common.ModelInfo(model_id=name, loaded=name in loaded)
            held = self.frames.peek(name)
            if held is not None:
                w, h = held.size
                info.frames_cached = True
                info.frame_count, info.frame_width, info.frame_height = held.count, w, h
                info.fps = held.fps
            else:
                info.fps = self.catalog.get(name).fps
            out.append(info)
        return common.ListModelsResponse(models=out)

    def load(self, model_id: str) -> common.LoadModelResponse:
        t0 = time.perf_counter()
        self.frames.get(self.known(model_id))
        resp = self.inference.load_model(model_id)
        resp.load_time_ms = (time.perf_counter() - t0) * 1e3
        return resp

    def unload(self, model_id: str) -> common.UnloadModelResponse:
        dropped = self.frames.unload(self.known(model_id))
        resp = self.inference.unload_model(model_id)
        if dropped and not resp.success:
            return common.UnloadModelResponse(success=True)
        return resp

    def stats(self, model_id: str) -> common.GetModelStatsResponse:
        if model_id:
            self.known(model_id)
        return self.inference.model_stats(model_id)
