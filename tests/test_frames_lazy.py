"""The frames store holds avatars as their files' bytes and decodes frames when used:
the same pixels as cv2.imread, sizes from the headers, memory about the compressed size."""

from __future__ import annotations

import cv2
import numpy as np

from compositing_service.frames import DecodedFrames, FrameStore
from lipsync.avatars.package import AvatarCatalog, image_size
from tests.avatar_factory import make_avatar


def test_lazy_frames_are_imread_pixels_and_cost_their_file_size(tmp_path):
    make_avatar(tmp_path, "png", n_frames=6, width=200, height=120, seed=1)
    make_avatar(
        tmp_path, "jpg", n_frames=4, width=96, height=160, seed=2, frame_name="frame_{i:04d}.jpg"
    )
    catalog = AvatarCatalog(tmp_path)
    store = FrameStore(catalog, max_avatars=10, max_bytes=1 << 30, decoded_max_bytes=1 << 30)
    for name, (w, h) in {"png": (200, 120), "jpg": (96, 160)}.items():
        files = catalog.get(name).frame_files()
        avatar = store.get(name)
        assert store.decoded.nbytes == 0 or name == "jpg"  # nothing decoded by loading
        assert avatar.size == (w, h) and avatar.count == len(files)
        assert avatar.nbytes == sum(f.stat().st_size for f in files)
        for f in files:
            assert image_size(f.read_bytes()) == (w, h)
        for i in (3, 0, 3, -1):
            want = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
            assert np.array_equal(avatar.frames[i], want)
    assert store.decoded.hits >= 2


def test_decoded_lru_is_bounded():
    lru = DecodedFrames(max_bytes=3 * 100)
    for i in range(5):
        lru.put((0, i), np.zeros(100, np.uint8))
    assert lru.nbytes == 300 and lru.get((0, 0)) is None and lru.get((0, 4)) is not None


def test_catalog_rescan_rereads_only_changed_manifests(tmp_path):
    for i in range(3):
        make_avatar(tmp_path, f"c{i}", n_frames=2, width=64, height=64, seed=i)
    catalog = AvatarCatalog(tmp_path)
    before = catalog.get("c1")
    catalog.rescan()
    assert catalog.get("c1") is before  # unchanged: the parsed manifest is reused
    manifest = tmp_path / "c2" / "avatar.yaml"
    manifest.write_text(manifest.read_text().replace("name: c2", "name: c2b"))
    catalog.rescan()
    assert catalog.names() == ["c0", "c1", "c2b"]


def test_an_oversized_frame_is_refused_from_its_header_at_load(tmp_path):
    """A small file whose header says 5000x5000 (a decompression bomb of 75 MB) is refused
    when the avatar loads, before any frame is decoded; the other avatars keep loading."""
    import pytest

    from lipsync.avatars.package import AvatarError

    folder = make_avatar(tmp_path, "bomb", n_frames=3, width=64, height=64, seed=3)
    ok, data = cv2.imencode(".png", np.zeros((5000, 5000, 3), np.uint8))
    assert ok and len(data) < 200_000  # compresses to little
    (folder / "frames" / "1.png").write_bytes(data.tobytes())
    make_avatar(tmp_path, "fine", n_frames=3, width=64, height=64, seed=4)
    store = FrameStore(AvatarCatalog(tmp_path), max_avatars=10, max_bytes=1 << 30)
    with pytest.raises(AvatarError, match="5000"):
        store.get("bomb")
    assert store.decoded.nbytes == 0
    assert store.get("fine").count == 3
