"""Shared fixtures: synthetic avatars on disk and both services on ephemeral ports."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from lipsync.config import Config, load_config
from tests.avatar_factory import make_avatar
from tests.onnx_models import build_test_encoder


@pytest.fixture(scope="session")
def avatars_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("avatars")
    make_avatar(root, "alice", n_frames=7, width=256, height=224, seed=0)
    # No own encoder (uses the shared one), JPEG frames with padded numbers.
    make_avatar(
        root,
        "bob",
        n_frames=5,
        width=200,
        height=240,
        seed=3,
        own_encoder=False,
        frame_name="frame_{i:04d}.png",
    )
    return root


@pytest.fixture(scope="session")
def shared_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_encoder(tmp_path_factory.mktemp("shared") / "audio_encoder.onnx", seed=9)


def service_config(avatars_root: Path, shared_encoder: Path) -> Config:
    cfg = load_config(env={})
    cfg.avatars_dir = str(avatars_root)
    cfg.inference.host = cfg.compositing.host = "127.0.0.1"
    cfg.inference.execution_providers = ["cuda", "cpu"]
    cfg.inference.intra_op_threads = 2
    cfg.inference.shared_audio_encoder = str(shared_encoder)
    cfg.compositing.jpeg_quality = 95
    cfg.compositing.workers = 2
    cfg.limits.max_batch_size = 32
    cfg.limits.max_audio_seconds = 30.0
    cfg.inference.metrics_port = cfg.compositing.metrics_port = 0  # tests/test_operations.py
    return cfg


@dataclasses.dataclass
class Services:
    cfg: Config
    inference: object
    compositing: object

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.compositing.port}"  # type: ignore[attr-defined]

    @property
    def inference_address(self) -> str:
        return f"127.0.0.1:{self.inference.port}"  # type: ignore[attr-defined]


def start_services(cfg: Config) -> Services:
    from compositing_service.server import start as start_compositing
    from inference_service.server import start as start_inference

    inf = start_inference(cfg, port=0)
    cfg.compositing.inference_address = f"127.0.0.1:{inf.port}"
    comp = start_compositing(cfg, port=0, preload=False)
    return Services(cfg, inf, comp)


def stop_services(s: Services) -> None:
    s.compositing.stop(0)  # type: ignore[attr-defined]
    s.inference.stop(0)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def services(avatars_root: Path, shared_encoder: Path) -> Iterator[Services]:
    s = start_services(service_config(avatars_root, shared_encoder))
    yield s
    stop_services(s)
