"""Checkpoint conversion (PyTorch -> ONNX), the SyncTalk_2D import and the `lipsync-avatar` CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from lipsync.avatars import convert as convert_module  # noqa: E402
from lipsync.avatars import synctalk_import  # noqa: E402
from lipsync.avatars.convert import (  # noqa: E402
    CheckpointError,
    MissingDependencyError,
    VerificationError,
    convert_checkpoints,
    load_state_dict,
)
from lipsync.avatars.nets import onnx_builder as ob  # noqa: E402
from lipsync.avatars.nets import torch_nets  # noqa: E402
from lipsync.avatars.package import load_manifest  # noqa: E402
from lipsync.avatars.synctalk_import import DatasetError, import_synctalk  # noqa: E402
from lipsync.cli.avatar import main  # noqa: E402
from tests.test_nets_onnx import reference_table  # noqa: E402

VERIFIED = "verified: ONNX Runtime matches PyTorch within 1e-4"


def _random_module(kind: str, seed: int) -> torch.nn.Module:
    module = torch_nets.ReferenceUNet() if kind == ob.KIND_UNET else torch_nets.AudioEncoder()
    sd = ob.random_reference_state_dict(kind, seed)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return module


@pytest.fixture(scope="module")
def unet_sd() -> dict[str, torch.Tensor]:
    return _random_module(ob.KIND_UNET, 1).state_dict()


@pytest.fixture(scope="module")
def encoder_sd() -> dict[str, torch.Tensor]:
    """As the shared checkpoint stores it: keys without the `audio_encoder.` prefix."""
    sd = _random_module(ob.KIND_AUDIO_ENCODER, 2).state_dict()
    return {k.removeprefix("audio_encoder."): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, unet_sd, encoder_sd) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    run = d / "checkpoint" / "may"
    run.mkdir(parents=True)
    torch.save(unet_sd, run / "12.pth")
    (run / "3.pth").write_bytes(b"an older epoch, never read")  # highest epoch wins
    torch.save(encoder_sd, d / "audio_visual_encoder.pth")
    return {"unet": run / "12.pth", "unet_dir": run, "encoder": d / "audio_visual_encoder.pth"}


@pytest.fixture(scope="module")
def converted(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("converted")
    return convert_checkpoints(ckpts["unet"], ckpts["encoder"], out), out


def _save(tmp_path: Path, sd: dict, name: str = "x.pth") -> Path:
    torch.save(sd, tmp_path / name)
    return tmp_path / name


# --- the PyTorch modules ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ob.KINDS)
def test_torch_state_dicts_equal_the_reference_tables(kind: str) -> None:
    module = torch_nets.ReferenceUNet() if kind == ob.KIND_UNET else torch_nets.AudioEncoder()
    shapes = list(torch_nets.state_dict_shapes(module).items())
    assert shapes == list(ob.expected_state_dict_shapes(kind).items())
    assert shapes == reference_table(kind)  # the .tsv itself, num_batches_tracked included


def test_torch_audio_modules_shapes() -> None:
    # The UNet's output shape and range are checked against ONNX Runtime by the conversion.
    with torch.inference_mode():
        feat = torch_nets.AudioEncoder().eval()(torch.randn(2, 1, 80, 16))
        audio = torch_nets.AudioConvAve().eval()(torch.randn(1, 32, 16, 16))
    assert feat.shape == (2, 512)
    assert audio.shape == (1, 512, 10, 10)  # 16x16 -> 10x10 by the stride-2 padding-3 conv


# --- convert_checkpoints ---------------------------------------------------------------------


def test_convert_writes_verified_models(converted) -> None:
    report, out = converted
    assert report.verified
    assert report.unet_path == out / "unet.onnx" and report.unet_path.is_file()
    assert report.audio_encoder_path == out / "audio_encoder.onnx"
    assert report.audio_encoder_path.is_file()
    assert set(report.max_abs_diffs) == {"unet", "audio_encoder"}
    assert all(0 <= d <= 1e-4 for d in report.max_abs_diffs.values())
    onnx.checker.check_model(str(report.unet_path))
    sess = ort.InferenceSession(str(report.unet_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input", "audio"]
    assert [o.name for o in sess.get_outputs()] == ["output"]
    enc = ort.InferenceSession(str(report.audio_encoder_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in enc.get_inputs()] == ["mel"]
    assert [o.name for o in enc.get_outputs()] == ["features"]


def test_converted_encoder_matches_torch_on_new_inputs(converted, encoder_sd) -> None:
    report, _ = converted
    module = torch_nets.AudioEncoder().eval()
    module.load_state_dict({"audio_encoder." + k: v for k, v in encoder_sd.items()})
    mel = np.random.default_rng(7).uniform(-4, 4, (5, 1, 80, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(mel)).numpy()
    sess = ort.InferenceSession(str(report.audio_encoder_path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"mel": mel})
    assert float(np.abs(got - expected).max()) <= 1e-4


def test_convert_cli_with_a_checkpoint_folder(ckpts, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models"
    rc = main(
        [
            "convert",
            "--unet",
            str(ckpts["unet_dir"]),
            "--audio-encoder",
            str(ckpts["encoder"]),
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "12.pth" in text  # the highest epoch, not 3.pth
    assert f"wrote {out / 'unet.onnx'}" in text and f"wrote {out / 'audio_encoder.onnx'}" in text
    assert "max abs difference" in text and VERIFIED in text
    assert (out / "unet.onnx").is_file() and (out / "audio_encoder.onnx").is_file()


def test_encoder_keys_with_prefix_and_no_encoder(tmp_path: Path, ckpts, encoder_sd) -> None:
    prefixed = _save(tmp_path, {"audio_encoder." + k: v for k, v in encoder_sd.items()})
    report = convert_checkpoints(ckpts["unet"], prefixed, tmp_path / "a", verify=False)
    assert not report.verified and report.max_abs_diffs == {}
    assert report.audio_encoder_path is not None and report.audio_encoder_path.is_file()
    report = convert_checkpoints(ckpts["unet"], None, tmp_path / "b", verify=False)
    assert report.audio_encoder_path is None
    assert not (tmp_path / "b" / "audio_encoder.onnx").exists()


def test_missing_key_is_refused(tmp_path: Path, unet_sd) -> None:
    sd = dict(unet_sd)
    del sd["up3.conv.double_conv.1.conv.4.running_mean"]
    with pytest.raises(CheckpointError, match=r"1 missing key.*up3\.conv\.double_conv\.1\.conv\.4"):
        convert_checkpoints(_save(tmp_path, sd), None, tmp_path / "out", verify=False)
    assert not (tmp_path / "out" / "unet.onnx").exists()


def test_unexpected_key_is_refused(tmp_path: Path, unet_sd) -> None:
    sd = {**unet_sd, "audio_model.conv8.conv.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected key.*audio_model\.conv8"):
        convert_checkpoints(_save(tmp_path, sd), None, tmp_path / "out", verify=False)


def test_wrong_shape_is_refused(tmp_path: Path, ckpts, encoder_sd) -> None:
    sd = {**encoder_sd, "11.conv_block.0.weight": torch.zeros(512, 256, 1, 1)}
    with pytest.raises(
        CheckpointError,
        match=r"audio encoder checkpoint .*wrong shape.*audio_encoder\.11\.conv_block\.0\.weight: "
        r"expected \(512, 256, 3, 3\), got \(512, 256, 1, 1\)",
    ):
        convert_checkpoints(ckpts["unet"], _save(tmp_path, sd), tmp_path / "out", verify=False)
    assert not (tmp_path / "out" / "unet.onnx").exists()  # checked before writing anything


def test_wrapped_and_malformed_checkpoints(tmp_path: Path, encoder_sd) -> None:
    wrapped = _save(tmp_path, {"state_dict": encoder_sd, "epoch": 3}, "w.pth")
    assert list(load_state_dict(wrapped)) == list(encoder_sd)
    both = _save(tmp_path, {"state_dict": encoder_sd, "model": encoder_sd}, "b.pth")
    with pytest.raises(CheckpointError, match="ambiguous"):
        load_state_dict(both)
    other = _save(tmp_path, {"net": encoder_sd}, "o.pth")
    with pytest.raises(CheckpointError, match=r"not a state dict.*'net'"):
        load_state_dict(other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_state_dict(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


def test_verification_failure_writes_nothing(tmp_path: Path, ckpts, monkeypatch) -> None:
    monkeypatch.setattr(convert_module, "_verify", lambda *args: 3e-3)
    with pytest.raises(VerificationError, match=r"differs from PyTorch by 0\.003"):
        convert_checkpoints(ckpts["unet"], None, tmp_path)
    assert not (tmp_path / "unet.onnx").exists()


def test_missing_torch_says_how_to_install(monkeypatch, ckpts) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[convert\]'"):
        load_state_dict(ckpts["unet"])


def test_cli_errors_are_one_line_with_status_2(tmp_path: Path, unet_sd, capsys) -> None:
    sd = dict(unet_sd)
    del sd["outc.conv.bias"]
    rc = main(["convert", "--unet", str(_save(tmp_path, sd)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lipsync-avatar: error: ") and "outc.conv.bias" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- import-synctalk -------------------------------------------------------------------------

N_FRAMES, WIDTH, HEIGHT = 4, 400, 360


def _expected_rect(i: int) -> list[int]:
    x1, y1, x2 = 100 + 10 * i, 150 + 5 * i, 260 + 10 * i
    return [x1, y1, x2, y1 + (x2 - x1)]


def make_dataset(root: Path, n: int = N_FRAMES, rows: int = 70) -> Path:
    """A SyncTalk_2D-like dataset: textured frames and .lms files with float coordinates."""
    rng = np.random.default_rng(0)
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i in range(n):
        img = np.stack([(xx + 7 * i) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
        img = (img + rng.integers(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
        assert cv2.imwrite(str(root / "full_body_img" / f"{i}.jpg"), img)
        pts = rng.uniform(0, 300, (rows, 2))
        x1, y1, x2, _ = _expected_rect(i)
        pts[1, 0] = x1 + 0.9  # truncated to x1
        pts[52, 1] = y1 + 0.4
        pts[31, 0] = x2 + 0.99
        text = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts) + "\n"
        (root / "landmarks" / f"{i}.lms").write_text(text)
    return root


def test_import_synctalk_builds_a_loadable_package(tmp_path: Path, ckpts, monkeypatch) -> None:
    data = make_dataset(tmp_path / "dataset" / "may")
    folder = import_synctalk(
        data,
        ckpts["unet"],
        ckpts["encoder"],
        "may",
        tmp_path / "avatars",
        link_frames=True,
        verify=False,
    ).folder
    assert folder == tmp_path / "avatars" / "may"
    m = load_manifest(folder)
    assert m.name == "may" and m.fps == 25
    assert m.unet == folder / "unet.onnx" and m.audio_encoder == folder / "audio_encoder.onnx"
    assert m.load_crop_rects().tolist() == [_expected_rect(i) for i in range(N_FRAMES)]
    assert json.loads((folder / "crop_rects.json").read_text())[0] == _expected_rect(0)
    files = m.frame_files()
    assert [p.name for p in files] == [f"{i}.jpg" for i in range(N_FRAMES)]
    src = data / "full_body_img" / "2.jpg"
    assert files[2].read_bytes() == src.read_bytes()
    assert files[2].stat().st_ino == src.stat().st_ino  # hard link
    assert not [p for p in (tmp_path / "avatars").iterdir() if p.name.startswith(".")]

    # Refuses to overwrite, unless asked; then replaces the package (copies, no encoder).
    with pytest.raises(DatasetError, match="already exists"):
        import_synctalk(data, ckpts["unet"], None, "may", tmp_path / "avatars", verify=False)
    folder = import_synctalk(
        data, ckpts["unet"], None, "may", tmp_path / "avatars", overwrite=True, verify=False
    ).folder
    m = load_manifest(folder)
    assert m.audio_encoder is None and not (folder / "audio_encoder.onnx").exists()
    assert m.frame_files()[2].stat().st_ino != src.stat().st_ino  # copied
    assert sorted(p.name for p in (tmp_path / "avatars").iterdir()) == ["may"]

    # A replacement that fails at the last step leaves the previous package in place.
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synctalk_import, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        import_synctalk(
            data, ckpts["unet"], ckpts["encoder"], "may", tmp_path / "avatars", overwrite=True,
            verify=False,
        )  # fmt: skip
    assert load_manifest(folder).audio_encoder is None
    assert sorted(p.name for p in (tmp_path / "avatars").iterdir()) == ["may"]

    # Never replaces a folder holding its own inputs.
    with pytest.raises(DatasetError, match="lies inside the destination"):
        import_synctalk(data, ckpts["unet"], None, "may", data.parent, overwrite=True)


def test_import_synctalk_cli(tmp_path: Path, ckpts, capsys) -> None:
    data = make_dataset(tmp_path / "ds")
    avatars = tmp_path / "avatars"
    rc = main(
        [
            "import-synctalk",
            "--dataset",
            str(data),
            "--unet",
            str(ckpts["unet"]),
            "--audio-encoder",
            str(ckpts["encoder"]),
            "--name",
            "may-2",
            "--out",
            str(avatars),
            "--link-frames",
            "--no-verify",  # verification through the CLI: test_convert_cli_...
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "not verified" in out and "4 frames" in out and "4 hard-linked" in out
    assert f"wrote {avatars / 'may-2' / 'avatar.yaml'}" in out
    m = load_manifest(avatars / "may-2")
    assert m.load_crop_rects().tolist() == [_expected_rect(i) for i in range(N_FRAMES)]

    rc = main(
        [
            "import-synctalk",
            "--dataset",
            str(data),
            "--unet",
            str(ckpts["unet"]),
            "--name",
            "../evil",
            "--out",
            str(avatars),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "invalid model_id" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "landmarks" / "2.lms").unlink(), r"without landmarks/<i>\.lms: 2"),
        (
            lambda d: (d / "landmarks" / "7.lms").write_text("1 2\n" * 60),
            r"landmarks without full_body_img/<i>\.jpg: 7",
        ),
        (
            lambda d: [
                (d / sub / f"1.{ext}").unlink()
                for sub, ext in (("full_body_img", "jpg"), ("landmarks", "lms"))
            ],
            r"missing from 0\.\.3: 1",
        ),
        (lambda d: (d / "landmarks" / "3.lms").write_text("1 2\n" * 40), r"3\.lms: 40 landmark"),
        (lambda d: (d / "landmarks" / "0.lms").write_text("1 2 3\n" * 60), r"0\.lms line 1"),
        (
            lambda d: (d / "landmarks" / "1.lms").write_text(
                "".join(f"{390 if k in (1, 31) else 10} 20\n" for k in range(60))
            ),
            r"frame 1 .*is empty",
        ),
        (
            lambda d: (d / "landmarks" / "1.lms").write_text(
                "".join(f"{380 if k == 31 else 200} {300 if k == 52 else 20}\n" for k in range(60))
            ),
            r"frame 1 \(400x360\): crop rect \[200, 300, 380, 480\].*does not fit",
        ),
        (lambda d: (d / "full_body_img" / "2.jpg").write_bytes(b"garbage"), r"2\.jpg: unreadable"),
    ],
)
def test_import_synctalk_refuses_bad_datasets(tmp_path: Path, ckpts, damage, message) -> None:
    data = make_dataset(tmp_path / "ds")
    damage(data)
    with pytest.raises(DatasetError, match=message):
        import_synctalk(data, ckpts["unet"], None, "x", tmp_path / "avatars", verify=False)
    assert not (tmp_path / "avatars" / "x").exists()


def test_import_with_a_bad_checkpoint_leaves_nothing(tmp_path: Path, unet_sd) -> None:
    data = make_dataset(tmp_path / "ds")
    sd = {k: v for k, v in unet_sd.items() if not k.startswith("up5.")}
    with pytest.raises(CheckpointError, match=r"missing key.*up5\."):
        import_synctalk(data, _save(tmp_path, sd), None, "x", tmp_path / "avatars")
    assert list((tmp_path / "avatars").iterdir()) == []
