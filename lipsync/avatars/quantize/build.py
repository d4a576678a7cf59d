"""`lipsync-avatar quantize`: an int8 UNet for an avatar package.

ONNX Runtime static quantization (quant_pre_process, then quantize_static with
QuantFormat.QDQ, per-channel int8 weights, MinMax calibration), calibrated on the
avatar's own face crops paired with audio blocks of speech-like audio that went through
the serving path (mel, mel windows, the audio encoder, feature blocks). Then the check:
int8 against float32 on other frames and other audio (lipsync.avatars.quantize.check). The int8
model, its check inputs and its calibration record are written into the package only
when the check passes; the record last, so a service never sees half a set.

Needs the `onnx` package (the `tools` extra) besides ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from lipsync.avatars.package import AvatarError, AvatarManifest, load_manifest
from lipsync.avatars.quantize.check import (
    CHECK_FILE,
    INT8_UNET_FILE,
    RECORD_FILE,
    CalibrationRecord,
    CheckResult,
    compare_runs,
    file_sha256,
    write_check_inputs,
)
from lipsync.avatars.quantize.options import (
    ACTIVATION_TYPES,
    CALIBRATIONS,
    QuantizeError,
    QuantizeOptions,
)
from lipsync.avatars.speech_signal import speech_like
from lipsync.core import mel, windows
from lipsync.core.visual import face_crop, inner, visual_input

log = logging.getLogger(__name__)

# The operators quantized, fastest first (measured on the reference-size UNet, one core:
# float32 0.103 CPU s a frame; int8 with these five 0.060-0.066, without Concat 0.070-0.076;
# Conv alone 0.121, slower than float32: the activations between convolutions stay float).
# Without --op-types the quantize command takes the first that passes the check.
OP_TYPE_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("Conv", "Relu", "LeakyRelu", "Resize", "Concat"),
    ("Conv", "Relu", "LeakyRelu", "Resize"),
)
STRIDE = 2  # calibration samples whose activations are held at once (MinMax, strided)
CALIBRATION_SPEECH_SEED = 11
CHECK_SPEECH_SEED = 29


@dataclass(frozen=True)
class QuantizeReport:
    folder: Path
    int8_path: Path | None  # None when the check failed (nothing written)
    record: CalibrationRecord
    check: CheckResult
    float_bytes: int
    int8_bytes: int


def _session(path: Path | str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


# Loudness of the speech's successive segments: real speech has quiet syllables and pauses,
# and an audio encoder's features for them can lie far outside those of loud speech (the
# reference-size encoder: features up to 35 in silence, 10 in loud speech-like audio).
SPEECH_GAINS = (1.0, 0.3, 0.0, 0.1, 0.6, 0.03)
SPEECH_SEGMENT_S = 0.5


def speech_mix(seconds: float, seed: int) -> np.ndarray:
    """Speech-like audio (lipsync.avatars.speech_signal.speech_like) whose loudness steps through
    SPEECH_GAINS, silence included, every SPEECH_SEGMENT_S seconds."""
    clip = speech_like(seconds, seed=seed)
    seg = int(SPEECH_SEGMENT_S * 16000)
    gains = np.array(SPEECH_GAINS, np.float32)[(np.arange(len(clip)) // seg) % len(SPEECH_GAINS)]
    return (clip * gains).astype(np.float32)


def _evenly(n_items: int, count: int, phase: float = 0.0) -> np.ndarray:
    """`count` indices spread over range(n_items) (repeats when count > n_items)."""
    return (np.floor((np.arange(count) + phase) * n_items / count) % n_items).astype(np.int64)


class AvatarSamples:
    """UNet inputs of an avatar: its own face crops (frame files decoded on demand) paired
    with audio blocks of speech-like audio through mel and the audio encoder."""

    def __init__(self, m: AvatarManifest, encoder: Path, count: int, seed: int, phase: float):
        self.files = m.frame_files()
        self.rects = m.load_crop_rects()
        if len(self.rects) < len(self.files):
            raise AvatarError(
                f"{m.crop_rects}: {len(self.rects)} rects for {len(self.files)} frames"
            )
        self.frame_idx = _evenly(len(self.files), count, phase)
        # enough speech for distinct audio under every sample, at least 4 s
        clip = speech_mix(max(4.0, count / 25.0 + 1.0), seed)
        spec = mel.melspectrogram(clip)
        enc = _session(encoder, 1)
        feats = enc.run(None, {enc.get_inputs()[0].name: windows.mel_windows(spec)})[0]
        n_clip = windows.clip_frame_count(len(spec))
        self.audio = windows.feature_blocks(feats, _evenly(n_clip, count, phase)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.frame_idx)

    def crop(self, i: int) -> np.ndarray:
        """Inner face crop uint8 [320, 320, 3] of sample i."""
        k = int(self.frame_idx[i])
        frame = cv2.imread(str(self.files[k]), cv2.IMREAD_COLOR)
        if frame is None:
            raise AvatarError(f"{self.files[k]}: could not decode the frame")
        return np.ascontiguousarray(inner(face_crop(frame, self.rects[k])))

    def crops(self) -> np.ndarray:
        return np.stack([self.crop(i) for i in range(len(self))])


def _reader(samples: AvatarSamples, visual_name: str, audio_name: str):  # type: ignore[no-untyped-def]
    """An ONNX Runtime CalibrationDataReader over `samples`, one frame per run, that
    supports CalibStridedMinMax (set_range): activations of STRIDE frames at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[int] = iter(range(len(samples)))

        def __len__(self) -> int:
            return len(samples)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(range(start_index, min(end_index, len(samples))))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            if i is None:
                return None
            return {
                visual_name: visual_input(samples.crop(i)),
                audio_name: samples.audio[i : i + 1],
            }

    return Reader()


@dataclass(frozen=True)
class UNetNames:
    visual: str
    audio: str
    output: str


def unet_names(sess: ort.InferenceSession) -> UNetNames:
    """A UNet's input names by shape (visual [B,6,...], audio [B,32,...]; else by position,
    visual first, as exported) and its output's."""
    inputs = sess.get_inputs()
    if len(inputs) != 2:
        raise QuantizeError(f"expected a UNet with 2 inputs, got {len(inputs)}")
    by_ch = {i.shape[1]: i.name for i in inputs if len(i.shape) == 4}
    visual, audio = by_ch.get(6), by_ch.get(32)
    if visual is None or audio is None:
        visual, audio = inputs[0].name, inputs[1].name
    return UNetNames(visual, audio, sess.get_outputs()[0].name)


def _conv_nodes(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def quantize_avatar(folder: Path | str, opts: QuantizeOptions | None = None) -> QuantizeReport:
    """Quantize the UNet of the avatar package `folder`, check it, and write it (with its
    check inputs and record) into the package if the check passes."""
    opts = opts or QuantizeOptions()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if opts.activation_type not in ACTIVATION_TYPES:
        raise QuantizeError(f"activation type must be one of {', '.join(ACTIVATION_TYPES)}")
    if opts.samples < 1 or not 1 <= opts.check_frames <= 64:
        raise QuantizeError("need at least 1 calibration sample and 1..64 check frames")
    if opts.calibration not in CALIBRATIONS:
        raise QuantizeError(f"calibration must be one of {', '.join(CALIBRATIONS)}")
    bad = set(opts.keep_float) - {"first", "last"}
    if bad:
        raise QuantizeError(f"--keep-float takes 'first' and/or 'last', not {sorted(bad)}")
    t_start = time.perf_counter()
    m = load_manifest(folder)
    encoder = opts.audio_encoder or m.audio_encoder
    if encoder is None:
        raise QuantizeError(
            f"{m.name}: the avatar has no audio_encoder.onnx; pass --audio-encoder (the "
            "encoder it is served with, inference.shared_audio_encoder)"
        )
    float_sess = _session(m.unet, opts.threads)
    binding = unet_names(float_sess)
    samples = -(-opts.samples // STRIDE) * STRIDE
    calib = AvatarSamples(m, encoder, samples, CALIBRATION_SPEECH_SEED, 0.0)
    check = AvatarSamples(m, encoder, opts.check_frames, CHECK_SPEECH_SEED, 0.5)
    act = QuantType.QUInt8 if opts.activation_type == "quint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=m.folder) as tmp_dir:
        tmp = Path(tmp_dir)
        pre = tmp / "unet.pre.onnx"
        quant_pre_process(str(m.unet), str(pre), skip_symbolic_shape=True)
        convs = _conv_nodes(pre)
        excluded = []
        if convs and "first" in opts.keep_float:
            excluded.append(convs[0])
        if convs and "last" in opts.keep_float and convs[-1] not in excluded:
            excluded.append(convs[-1])
        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[opts.calibration]
        check_crops = check.crops()
        check_visual = visual_input(check_crops)

        def run_float(v: np.ndarray, a: np.ndarray) -> np.ndarray:
            return float_sess.run([binding.output], {binding.visual: v, binding.audio: a})[0]

        # explicit operators: that set; else the candidates, fastest first, until one passes
        candidates = [opts.op_types] if opts.op_types is not None else list(OP_TYPE_CANDIDATES)
        attempts: list[dict] = []
        for i, op_types in enumerate(candidates):
            int8_tmp = tmp / f"attempt{i}.onnx"
            log.info("calibrating %s on %d frames, quantizing %s", m.name, samples, op_types)
            t0 = time.perf_counter()
            chatter = io.StringIO()  # ONNX Runtime's calibrators print their progress
            with contextlib.redirect_stdout(chatter):
                quantize_static(
                    str(pre),
                    str(int8_tmp),
                    _reader(calib, binding.visual, binding.audio),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=opts.reduce_range,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    nodes_to_exclude=excluded,
                    op_types_to_quantize=list(op_types) or None,
                    extra_options={"CalibStridedMinMax": STRIDE},
                )
            log.debug("%s", chatter.getvalue())
            log.info("quantized in %.1f s", time.perf_counter() - t0)
            int8_sess = _session(int8_tmp, opts.threads)
            ib = unet_names(int8_sess)

            def run_int8(v: np.ndarray, a: np.ndarray, s=int8_sess, b=ib) -> np.ndarray:  # type: ignore[no-untyped-def]
                return s.run([b.output], {b.visual: v, b.audio: a})[0]

            result = compare_runs(run_float, run_int8, check_visual, check.audio, opts.bounds)
            attempts.append({"op_types": list(op_types), **result.to_dict()})
            log.info("%s: %s", op_types or "ONNX Runtime's operators", result.describe())
            if result.passed:
                break
        record = CalibrationRecord(
            float_sha256=file_sha256(m.unet),
            calibrate_method=str(method).rsplit(".", 1)[-1],
            op_types=list(op_types),
            attempts=attempts,
            int8_sha256=file_sha256(int8_tmp),
            check=result.to_dict(),
            activation_type=str(act).rsplit(".", 1)[-1],
            reduce_range=opts.reduce_range,
            nodes_excluded=excluded,
            samples=samples,
            calibration_data=(
                f"{samples} of the avatar's face crops (frames spread evenly) with audio "
                f"blocks of speech_mix(seed={CALIBRATION_SPEECH_SEED}) (speech_like at "
                f"gains {', '.join(map(str, SPEECH_GAINS))} every {SPEECH_SEGMENT_S} s) "
                "through mel, the audio encoder and feature blocks; check: "
                f"{opts.check_frames} other frames, speech_mix(seed={CHECK_SPEECH_SEED})"
            ),
            onnxruntime=ort.__version__,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - t_start, 1),
        )
        int8_bytes = int8_tmp.stat().st_size
        if not result.passed:
            return QuantizeReport(m.folder, None, record, result, m.unet.stat().st_size, int8_bytes)
        dest = m.unet.parent / INT8_UNET_FILE
        check_tmp = tmp / CHECK_FILE
        write_check_inputs(check_tmp, check_crops, check.audio)
        record_tmp = tmp / RECORD_FILE
        record_tmp.write_text(record.to_json())
        # the record last: a service reading the package meanwhile sees a stale record,
        # whose sha256 no longer matches, and refuses the int8 model until it is written
        (dest.parent / RECORD_FILE).unlink(missing_ok=True)
        os.replace(int8_tmp, dest)
        os.replace(check_tmp, dest.parent / CHECK_FILE)
        os.replace(record_tmp, dest.parent / RECORD_FILE)
    return QuantizeReport(
        m.folder, dest, record, result, m.unet.stat().st_size, dest.stat().st_size
    )


def describe(report: QuantizeReport) -> str:
    r = report.record
    ops = ", ".join(r.op_types) or "ONNX Runtime's set"
    lines = [
        f"calibrated on {r.samples} frames ({r.calibrate_method}, activations "
        f"{r.activation_type}, weights {r.weight_type} per channel"
        + (", reduce_range" if r.reduce_range else "")
        + (f", kept in float: {', '.join(r.nodes_excluded)}" if r.nodes_excluded else "")
        + f"; onnxruntime {r.onnxruntime}) in {r.seconds:.1f} s; operators quantized: {ops}",
    ]
    for a in r.attempts[:-1]:
        lines.append(
            f"  tried first {', '.join(a['op_types']) or 'all'}: mean {a['mean_psnr_db']:.2f} "
            f"dB, worst {a['worst_psnr_db']:.2f} dB: failed the check"
        )
    lines.append(report.check.describe())
    return "\n".join(lines)
