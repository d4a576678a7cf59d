"""The bundled demo avatar, served by the real services: its mouth follows speech it was
never trained on (assets/speech/demo.wav is a held-out voice and held-out sentences)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync.avatars.package import load_manifest
from lipsync.client import LipsyncClient, load_audio
from lipsync.core.timeline import pingpong
from tests.conftest import service_config, start_services, stop_services
from training.demo_avatar.evaluate import lipsync_correlation

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "avatars" / "demo"


def test_demo_package_is_valid_and_small():
    m = load_manifest(DEMO)
    assert m.name == "demo" and m.audio_encoder is not None
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 30 * 1024 * 1024


@pytest.fixture(scope="module")
def demo_services(shared_encoder):
    cfg = service_config(REPO / "avatars", shared_encoder)
    s = start_services(cfg)
    yield s
    stop_services(s)


def test_demo_mouth_follows_unheard_speech(demo_services):
    audio, _ = load_audio(REPO / "assets" / "speech" / "demo.wav")
    with LipsyncClient(demo_services.address) as client:
        jpegs = list(client.render("demo", audio))
    frames = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    rects = json.loads((DEMO / "crop_rects.json").read_text())
    used = [rects[pingpong(k, len(rects))] for k in range(len(frames))]
    res = lipsync_correlation(frames, audio, used)
    assert res["r0"] >= 0.6, res["r"]
    assert res["best_lag"] in (-1, 0, 1), res["r"]
