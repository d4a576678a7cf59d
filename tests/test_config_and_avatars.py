"""Config loading (YAML, environment) and the avatar package format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lipsync.avatars.package import (
    AvatarCatalog,
    AvatarError,
    UnknownModelError,
    check_model_id,
    list_frame_files,
    load_crop_rects,
    load_manifest,
)
from lipsync.config import ConfigError, ignored_env_vars, load_config, to_dict
from tests.avatar_factory import make_avatar

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_example_file_agree():
    example = REPO / "deploy" / "config.example.yaml"
    assert to_dict(load_config(example, env={})) == to_dict(load_config(env={}))


def test_yaml_then_environment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"compositing": {"jpeg_quality": 70, "port": 6000}}))
    cfg = load_config(
        f,
        env={
            "LIPSYNC_COMPOSITING__JPEG_QUALITY": "85",
            "AVATARS_DIR": "/data/avatars",
            "INFERENCE_ADDRESS": "gpu:50051",
            "LIPSYNC_INFERENCE__EXECUTION_PROVIDERS": "cpu",
            "LIPSYNC_INFERENCE__REGISTRY__PRELOAD": "[a, b]",
        },
    )
    assert cfg.compositing.jpeg_quality == 85
    assert cfg.compositing.port == 6000
    assert cfg.avatars_dir == "/data/avatars"
    assert cfg.compositing.inference_address == "gpu:50051"
    assert cfg.inference.execution_providers == ["cpu"]
    assert cfg.inference.registry.preload == ["a", "b"]


@pytest.mark.parametrize(
    "env",
    [
        {"LIPSYNC_COMPOSITING__JPEG_QUALITY": "200"},
        {"LIPSYNC_INFERENCE__PORT": "many"},
        {"LIPSYNC_INFERENCE__REGISTRY__EVICTION": "random"},
    ],
)
def test_bad_config_is_refused(env):
    with pytest.raises(ConfigError):
        load_config(env=env)


# What Kubernetes injects into every pod of a namespace with a Service named
# `lipsync-inference` (port 50051, named grpc) unless the pod sets enableServiceLinks: false.
SERVICE_LINKS = {
    "LIPSYNC_INFERENCE_SERVICE_HOST": "10.96.0.12",
    "LIPSYNC_INFERENCE_SERVICE_PORT": "50051",
    "LIPSYNC_INFERENCE_SERVICE_PORT_GRPC": "50051",
    "LIPSYNC_INFERENCE_PORT": "tcp://10.96.0.12:50051",
    "LIPSYNC_INFERENCE_PORT_50051_TCP": "tcp://10.96.0.12:50051",
    "LIPSYNC_INFERENCE_PORT_50051_TCP_PROTO": "tcp",
    "LIPSYNC_INFERENCE_PORT_50051_TCP_PORT": "50051",
    "LIPSYNC_INFERENCE_PORT_50051_TCP_ADDR": "10.96.0.12",
    "LIPSYNC_WEB_PORT": "tcp://10.96.0.14:8080",
}


def test_kubernetes_service_links_are_ignored_not_refused(caplog):
    env = {**SERVICE_LINKS, "LIPSYNC_COMPOSITING__JPEG_QUALITY": "85", "LIPSYNC_LOG_LEVEL": "DEBUG"}
    with caplog.at_level("DEBUG", logger="lipsync.config"):
        cfg = load_config(env=env)
    assert cfg.compositing.jpeg_quality == 85 and cfg.log_level == "DEBUG"
    assert cfg.inference.port == 50051 and cfg.web.port == 8080  # untouched
    assert ignored_env_vars(env) == sorted(SERVICE_LINKS)
    ignored = [r for r in caplog.records if "names no config field" in r.getMessage()]
    assert len(ignored) == len(SERVICE_LINKS)
    assert all(r.levelname == "DEBUG" for r in ignored)


@pytest.mark.parametrize(
    "key",
    [
        "LIPSYNC_COMPOSITING__JPEG_QUALITYY",  # a typo
        "LIPSYNC_COMPOSITING__FRAME_CACHE",  # a section, not a field
        "LIPSYNC_INFERENCE__PORT__X",  # below a field
        "LIPSYNC_NOSUCH__PORT",
    ],
)
def test_env_vars_naming_no_field_are_ignored_with_a_warning(key, caplog):
    with caplog.at_level("DEBUG", logger="lipsync.config"):
        cfg = load_config(env={key: "80"})
    assert to_dict(cfg) == to_dict(load_config(env={}))
    assert ignored_env_vars({key: "80", "LIPSYNC_CONFIG": "x.yaml"}) == [key]
    (rec,) = [r for r in caplog.records if key in r.getMessage()]
    assert rec.levelname == "WARNING"


def test_unknown_key_in_yaml_is_still_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"compositing": {"jpeg_qualityy": 80}}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(f, env=SERVICE_LINKS)
    f.write_text(yaml.safe_dump({"inference_service_host": "x"}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(f, env={})


@pytest.mark.parametrize(
    "bad", ["", "..", "../x", "a/b", "/etc/passwd", "a\\b", ".hidden", "x" * 200, "a..b", "é"]
)
def test_model_ids_that_could_touch_the_file_system_are_refused(bad):
    with pytest.raises(UnknownModelError):
        check_model_id(bad)


@pytest.mark.parametrize("good", ["demo", "Alice_2", "v1.2-final"])
def test_good_model_ids(good):
    assert check_model_id(good) == good


def test_frames_in_numeric_order(tmp_path):
    for name in ["10.jpg", "2.jpg", "1.jpg", "frame_0003.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_frame_files(tmp_path)] == [
        "1.jpg",
        "2.jpg",
        "frame_0003.png",
        "10.jpg",
    ]
    (tmp_path / "frame_2.png").write_bytes(b"x")
    with pytest.raises(AvatarError, match="same frame number"):
        list_frame_files(tmp_path)


def test_crop_rects_checked(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps([[1, 2, 30, 40]]))
    assert load_crop_rects(f).tolist() == [[1, 2, 30, 40]]
    for bad in ([[1, 2, 3]], [[5, 5, 5, 9]], [[0, 0, 1.5, 2]], "x", []):
        f.write_text(json.dumps(bad))
        with pytest.raises(AvatarError):
            load_crop_rects(f)


def test_manifest_paths_must_stay_inside(tmp_path):
    folder = make_avatar(tmp_path, "a", n_frames=2)
    m = load_manifest(folder)
    assert m.name == "a" and m.fps == 25 and m.audio_encoder is not None
    data = yaml.safe_load((folder / "avatar.yaml").read_text())
    data["unet"] = "../../etc/passwd"
    (folder / "avatar.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(AvatarError, match="outside"):
        load_manifest(folder)


def test_catalog_skips_broken_folders_and_finds_new_ones(tmp_path):
    make_avatar(tmp_path, "good", n_frames=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "avatar.yaml").write_text("name: broken\nunet: missing.onnx\n")
    cat = AvatarCatalog(tmp_path, rescan_interval_s=0)  # (rate limit: test_hardening)
    assert cat.names() == ["good"]
    assert "broken" in cat.errors
    with pytest.raises(UnknownModelError):
        cat.get("broken")
    make_avatar(tmp_path, "later", n_frames=2)
    assert cat.get("later").name == "later"  # an unknown id triggers one rescan
