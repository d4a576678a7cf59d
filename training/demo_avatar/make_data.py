"""Generate everything the `demo` avatar is trained on, deterministically.

Outputs
-------
* ``avatars/demo/frames/<k>.jpg`` and ``avatars/demo/crop_rects.json``: the background
  "video" -- scikit-image's ``astronaut`` photo (NASA, public domain) zoomed on the face,
  with the smiling mouth painted out and a closed mouth drawn instead, swaying gently
  (a smooth rotation / shift / tiny zoom path whose speed is zero at both ends, so the
  services' ping-pong walk over the frames never jerks).
* ``assets/speech/demo.wav``: the bundled demo speech (held-out sentences, held-out voice).
* ``<data-dir>/speech/<id>.wav`` + ``<data-dir>/clips.json``: espeak-ng speech clips
  (16 kHz mono, level-normalised), with the split (train / heldout), voice, speed, pitch
  and text of each.
* ``<data-dir>/mouth_cache.npy``: uint8 ``[N, L, 320, 320, 3]``, the 320x320 network
  square (docs/SEMANTICS.md, "Face crop": crop of the rect, resize to 328 cubic, [4:324]) of
  background frame ``k`` re-rendered with a mouth opened to level ``l / (L - 1)``,
  JPEG-round-tripped like the shipped frames. Level 0 is the shipped background frame.

The training target of a video frame is ``opening(t)`` with ``t = frame / 25`` s: the
speech RMS in an 80 ms window centred on ``t`` (see :func:`speech_envelope`), mapped to
[0, 1] by :func:`opening_from_envelope`.

Run: ``.venv/bin/python -m training.demo_avatar.make_data`` (needs the ``espeak-ng``
binary and scikit-image).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
AVATAR_DIR = REPO / "avatars" / "demo"
DEMO_WAV = REPO / "assets" / "speech" / "demo.wav"
DEFAULT_DATA_DIR = Path("/tmp/demo_avatar_data")

SR = 16000
FPS = 25
N_FRAMES = 75  # background video length (3 s; the services ping-pong over it)
FRAME_SIZE = 512
JPEG_QUALITY = 90
LEVELS = 16  # quantised mouth openings in the training cache
SEED = 1234

# --- face geometry, in the coordinates of the un-posed 512x512 base image -------------
# The base image is astronaut[0:320, 64:384] resized x1.6 (cubic).
SRC_BOX = (64, 0, 384, 320)  # x0, y0, x1, y1 in the 512x512 astronaut photo
MOUTH_CX, MOUTH_CY = 255.0, 231.0  # centre of the lips' meeting line
MOUTH_HALF_W = 32.0
SMILE = 5.0  # corners this many px above the centre
UPPER_LIP, LOWER_LIP = 7.5, 8.5  # lip thickness at the centre
MAX_OPEN = 20.0  # inner-mouth height at opening 1
JAW_SHARE = 0.8  # share of the opening taken by the jaw (lower lip + chin move down)
CHIN_Y = 293.0
POSE_CENTRE = (255.0, 260.0)
# Landmark-like crop rect of the base image: cheek to cheek, from mid-nose; square.
RECT_LEFT = (189.0, 240.0)
RECT_RIGHT = (321.0, 240.0)
RECT_TOP = (255.0, 180.0)

# --- speech ------------------------------------------------------------------------------
TRAIN_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan"]
TRAIN_VARIANTS = ["", "m1", "m2", "m3", "m4", "f1", "f2", "f4", "klatt"]
HELDOUT_VOICES = ["en-gb-x-rp+f3", "en-gb-x-gbcwmd+m7"]  # language x variant never trained
N_TRAIN_CLIPS = 360
ACTIVE_RMS = 0.1  # clips are scaled so the RMS of their voiced part is this
ENV_WINDOW_S = 0.08  # speech envelope: RMS in a window of this length centred on t
OPEN_REF = 0.16  # envelope giving a fully open mouth
OPEN_GAMMA = 0.8

HELDOUT_SENTENCES = [
    "Good morning, and welcome aboard the shuttle.",
    "Please keep your helmet on until we reach orbit.",
    "The weather over the ocean looks calm this afternoon.",
    "I never thought a tiny robot could paint such a bright mural.",
    "Would you like some warm soup before the lecture begins?",
    "Our library opens at nine and closes quite late on Fridays.",
    "Seven curious otters swam across the frozen harbour.",
    "Honestly, the quickest route is through the old market square.",
    "Remember to water the tomatoes twice a week in summer.",
    "Every engineer on the team signed the birthday card.",
    "Jupiter has dozens of moons, and some hide deep oceans.",
    "Thank you for listening, and have a wonderful evening.",
]
# the bundled demo clip: three held-out sentences in a held-out voice
DEMO_SENTENCES = [0, 2, 11]  # ~9.5 s at speed 175
DEMO_VOICE = "en-gb-x-rp+f3"

_SUBJECTS = [
    "the pilot",
    "my neighbour",
    "a young doctor",
    "the old fisherman",
    "our teacher",
    "the captain",
    "a clever student",
    "the baker",
    "my sister",
    "the mayor",
    "a small dog",
    "the gardener",
    "her brother",
    "the engineer",
    "a tired traveller",
    "the musician",
    "the farmer",
    "our manager",
    "a famous painter",
    "the children",
    "everybody",
    "the scientist",
    "my grandfather",
    "the nurse",
    "a quiet librarian",
]
_VERBS = [
    "found",
    "carried",
    "painted",
    "bought",
    "opened",
    "repaired",
    "counted",
    "watched",
    "followed",
    "remembered",
    "packed",
    "cleaned",
    "borrowed",
    "described",
    "measured",
    "ordered",
    "lifted",
    "hid",
    "delivered",
    "photographed",
    "visited",
    "tested",
]
_OBJECTS = [
    "a red umbrella",
    "the wooden boxes",
    "three silver keys",
    "a map of the city",
    "the broken window",
    "a basket of apples",
    "the heavy suitcase",
    "an old guitar",
    "the blue bicycle",
    "a letter from home",
    "the kitchen table",
    "some fresh bread",
    "the last train ticket",
    "a yellow kite",
    "the strange machine",
    "a pile of books",
    "the garden gate",
    "two cups of coffee",
    "a golden ring",
    "the paper lanterns",
]
_PLACES = [
    "near the river",
    "after lunch",
    "in the morning",
    "before the storm",
    "at the station",
    "during the concert",
    "behind the library",
    "on Monday",
    "under the bridge",
    "at midnight",
    "by the harbour",
    "in the village",
    "after the meeting",
    "on the mountain",
    "in the garden",
    "at the airport",
]
_QUESTIONS = [
    "why did {s} leave so early",
    "where is {o}",
    "can you see {o} {p}",
    "how many people came {p}",
    "do you think {s} will come back",
    "what happened to {o}",
    "is it true that {s} {v} {o}",
]
_EXTRAS = [
    "Oh, really?",
    "Yes, of course.",
    "No, not today.",
    "Well, maybe later.",
    "That is wonderful!",
    "Hmm, let me think.",
    "Absolutely.",
    "I am not so sure.",
    "Wait a moment.",
    "Look at that!",
]


def _train_sentence(rng: np.random.Generator) -> str:
    s, v, o, p = (
        rng.choice(_SUBJECTS),
        rng.choice(_VERBS),
        rng.choice(_OBJECTS),
        rng.choice(_PLACES),
    )
    kind = rng.integers(0, 5)
    if kind == 0:
        text = f"{s} {v} {o} {p}."
    elif kind == 1:
        text = f"{p}, {s} {v} {o}."
    elif kind == 2:
        q = rng.choice(_QUESTIONS).format(s=s, v=v, o=o, p=p)
        text = f"{q}?"
    elif kind == 3:
        s2, v2, o2 = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        text = f"{s} {v} {o}, and {s2} {v2} {o2}."
    else:
        text = f"{rng.choice(_EXTRAS)} {s} {v} {o}."
    return text[0].upper() + text[1:]


# ========================================================================================
# Speech
# ========================================================================================


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Synthesize ``text`` with espeak-ng; float32 mono at 16 kHz."""
    import librosa

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        x, sr = sf.read(path, dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    return librosa.resample(x, orig_sr=sr, target_sr=SR, res_type="soxr_hq").astype(np.float32)


def normalise_level(x: np.ndarray) -> np.ndarray:
    """Scale so the RMS of the voiced part (20 ms blocks within 40 dB of the loudest) is
    ACTIVE_RMS; the peak is kept below 0.99."""
    blk = 320
    n = len(x) // blk
    rms = np.sqrt(np.mean(x[: n * blk].reshape(n, blk) ** 2, axis=1) + 1e-12)
    active = rms[rms > rms.max() * 0.01]
    g = ACTIVE_RMS / np.sqrt(np.mean(active**2))
    g = min(g, 0.99 / (np.abs(x).max() + 1e-9))
    return (x * g).astype(np.float32)


def speech_envelope(
    audio: np.ndarray,
    n_frames: int,
    fps: int = FPS,
    offset_s: float = 0.0,
    window_s: float = ENV_WINDOW_S,
) -> np.ndarray:
    """RMS of ``audio`` (16 kHz) in a ``window_s`` window centred on ``k / fps + offset_s``
    for k = 0..n_frames-1 (zeros outside the clip). float64 ``[n_frames]``."""
    half = round(float(window_s * SR / 2))
    a = np.concatenate([np.zeros(half), np.asarray(audio, np.float64).reshape(-1), np.zeros(half)])
    c = np.concatenate([[0.0], np.cumsum(a * a)])
    centres = np.round((np.arange(n_frames) / fps + offset_s) * SR).astype(np.int64) + half
    lo = np.clip(centres - half, 0, len(a))
    hi = np.clip(centres + half, 0, len(a))
    return np.sqrt((c[hi] - c[lo]) / (2 * half))


def opening_from_envelope(env: np.ndarray) -> np.ndarray:
    return np.clip(env / OPEN_REF, 0.0, 1.0) ** OPEN_GAMMA


def make_speech(data_dir: Path) -> list[dict]:
    rng = np.random.default_rng(SEED)
    out_dir = data_dir / "speech"
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    seen: set[str] = set()
    held = {s.lower() for s in HELDOUT_SENTENCES}

    def add(cid, text, voice, split):
        speed = int(rng.integers(130, 201))
        pitch = int(rng.integers(30, 71))
        x = espeak(text, voice, speed, pitch)
        lead, tail = rng.uniform(0.15, 0.6, size=2)
        x = np.concatenate([np.zeros(int(lead * SR)), x, np.zeros(int(tail * SR))])
        x = normalise_level(x)
        sf.write(out_dir / f"{cid}.wav", x, SR, subtype="FLOAT")
        clips.append(
            dict(
                id=cid,
                split=split,
                voice=voice,
                speed=speed,
                pitch=pitch,
                text=text,
                seconds=round(len(x) / SR, 3),
            )
        )

    i = 0
    while i < N_TRAIN_CLIPS:
        parts = [_train_sentence(rng) for _ in range(int(rng.integers(1, 3)))]
        text = " ".join(parts)
        if text.lower() in seen or any(p.lower() in held for p in parts):
            continue
        seen.add(text.lower())
        variant = TRAIN_VARIANTS[int(rng.integers(len(TRAIN_VARIANTS)))]
        voice = TRAIN_VOICES[int(rng.integers(len(TRAIN_VOICES)))] + (
            f"+{variant}" if variant else ""
        )
        add(f"train_{i:04d}", text, voice, "train")
        i += 1
    # held-out: every held-out sentence in a held-out voice and in a training voice
    for j, text in enumerate(HELDOUT_SENTENCES):
        add(f"heldout_{j:02d}a", text, HELDOUT_VOICES[j % 2], "heldout")
        add(f"heldout_{j:02d}b", text, "en-us+f2" if j % 2 else "en-gb+m3", "heldout_trainvoice")
    (data_dir / "clips.json").write_text(json.dumps(clips, indent=1))
    return clips


def make_demo_wav() -> None:
    parts = []
    for j in DEMO_SENTENCES:
        x = espeak(HELDOUT_SENTENCES[j], DEMO_VOICE, 175, 55)
        parts += [x, np.zeros(int(0.3 * SR), np.float32)]
    x = np.concatenate([np.zeros(int(0.3 * SR), np.float32), *parts])
    x = normalise_level(x)
    DEMO_WAV.parent.mkdir(parents=True, exist_ok=True)
    sf.write(DEMO_WAV, x, SR, subtype="PCM_16")
    print(f"wrote {DEMO_WAV} ({len(x) / SR:.2f} s)")


# ========================================================================================
# Face
# ========================================================================================


def base_image() -> np.ndarray:
    """The un-posed 512x512 BGR face with the original (smiling, teeth) mouth painted out."""
    from skimage import data

    im = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    x0, y0, x1, y1 = SRC_BOX
    z = cv2.resize(im[y0:y1, x0:x1], (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros(z.shape[:2], np.uint8)
    cv2.ellipse(mask, (int(MOUTH_CX), int(MOUTH_CY + 1)), (41, 19), 0, 0, 360, 255, -1)
    filled = cv2.inpaint(z, mask, 9, cv2.INPAINT_TELEA)
    # Telea leaves streaks: smooth the filled area and blend it in softly
    smooth = cv2.GaussianBlur(filled, (0, 0), 4.0)
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 3.0)[..., None]
    out = filled * (1 - soft) + smooth * soft
    return np.clip(out, 0, 255).astype(np.uint8)


def _jaw_warp(img: np.ndarray, drop: float) -> np.ndarray:
    """Move the lower lip's skin down by ``drop`` px (a quarter of it at the chin)."""
    if drop <= 0:
        return img
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    gx = np.exp(-(((xs - MOUTH_CX) / 40.0) ** 2))
    ramp_in = np.clip((ys - (MOUTH_CY - 4)) / 12.0, 0, 1)
    # full drop under the lower lip, a quarter at the chin, none 20 px below it
    lip_y = MOUTH_CY + 8.0
    prof = np.interp(ys, [lip_y, CHIN_Y, CHIN_Y + 20.0], [1.0, 0.25, 0.0])
    d = (drop * gx * ramp_in * prof).astype(np.float32)
    return cv2.remap(img, xs, ys - d, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)


def _lip_curves(opening: float, ss: int):
    """Mouth outline curves (x, y arrays) at supersampling ``ss``, patch-relative."""
    h = MAX_OPEN * opening
    hw = MOUTH_HALF_W * (1 - 0.12 * opening)
    s = np.linspace(-1, 1, 97)
    x = MOUTH_CX + hw * s
    meet = MOUTH_CY - SMILE * s**2
    env = (1 - s**2) ** 0.7
    bow = 1.6 * np.exp(-((s / 0.13) ** 2)) - 0.8 * np.exp(-(((np.abs(s) - 0.3) / 0.15) ** 2))
    up_out = meet - UPPER_LIP * (1 - s**2) ** 0.55 + bow - 0.12 * h * env
    up_in = meet - (1 - JAW_SHARE) * h * env
    lo_in = meet + JAW_SHARE * h * env
    lo_out = lo_in + LOWER_LIP * (1 - s**2) ** 0.5
    return x, up_out, up_in, lo_in, lo_out, h, hw


def draw_mouth(img: np.ndarray, opening: float) -> np.ndarray:
    """Draw lips (and, when open, the dark inner mouth, teeth and tongue) on the base image,
    after dropping the jaw by JAW_SHARE * MAX_OPEN * opening."""
    opening = float(np.clip(opening, 0, 1))
    img = _jaw_warp(img, JAW_SHARE * MAX_OPEN * opening)
    ss = 4
    px0, py0, pw, ph = int(MOUTH_CX) - 56, int(MOUTH_CY) - 28, 112, 72
    x, up_out, up_in, lo_in, lo_out, h, hw = _lip_curves(opening, ss)

    def pts(xx, yy):
        return np.round(np.stack([(xx - px0) * ss, (yy - py0) * ss], 1)).astype(np.int32)

    big = np.zeros((ph * ss, pw * ss, 3), np.float32)
    alpha = np.zeros((ph * ss, pw * ss), np.float32)
    lip = np.array([118, 120, 196], np.float32)
    lip_dark = np.array([66, 64, 120], np.float32)
    # lips: the whole outline filled
    outline = np.concatenate([pts(x, up_out), pts(x[::-1], lo_out[::-1])])
    cv2.fillPoly(alpha, [outline], 1.0, cv2.LINE_AA)
    # colour layer: solid (no anti-aliasing) and a little wider than the outline, so the
    # soft alpha edge blends lip colour, not a dark fringe, into the skin
    hard = np.zeros_like(alpha)
    cv2.fillPoly(hard, [outline], 1.0)
    cv2.polylines(hard, [outline], True, 1.0, 3 * ss)
    big[hard > 0] = lip
    # lower-lip highlight, upper-lip shade
    yy = np.arange(ph * ss)[:, None] / ss + py0
    lower = (yy > MOUTH_CY + JAW_SHARE * h).astype(np.float32)
    big += (lower * 12.0 - (1 - lower) * 10.0)[..., None] * (hard[..., None] > 0)
    if h < 0.6:
        cv2.polylines(
            big,
            [pts(x[8:-8], up_in[8:-8] + 0.3)],
            False,
            lip_dark.tolist(),
            int(1.4 * ss),
            cv2.LINE_AA,
        )
    else:
        inner = np.concatenate([pts(x, up_in), pts(x[::-1], lo_in[::-1])])
        cv2.fillPoly(big, [inner], (38, 28, 52), cv2.LINE_AA)
        layer = np.zeros_like(big)
        m_in = np.zeros(alpha.shape, np.float32)
        cv2.fillPoly(m_in, [inner], 1.0, cv2.LINE_AA)
        # tongue
        cv2.ellipse(
            layer,
            (int((MOUTH_CX - px0) * ss), int((MOUTH_CY + JAW_SHARE * h * 0.9) * ss)),
            (int(hw * 0.6 * ss), int(max(h * 0.35, 1) * ss)),
            0,
            180,
            360,
            (66, 58, 128),
            -1,
            cv2.LINE_AA,
        )
        # upper teeth: a band under the upper lip
        t = min(4.5, 0.4 * h)
        sel = np.abs(np.linspace(-1, 1, 97)) < 0.72
        teeth = np.concatenate(
            [pts(x[sel], up_in[sel] - 1), pts(x[sel][::-1], up_in[sel][::-1] + t)]
        )
        cv2.fillPoly(layer, [teeth], (200, 208, 216), cv2.LINE_AA)
        lm = (layer.sum(-1) > 0).astype(np.float32)[..., None] * m_in[..., None]
        big = big * (1 - lm) + layer * lm
    small = cv2.resize(big * hard[..., None], (pw, ph), interpolation=cv2.INTER_AREA)
    cover = cv2.resize(hard, (pw, ph), interpolation=cv2.INTER_AREA)[..., None]
    color = np.clip(small / np.maximum(cover, 1e-3), 0, 255)
    a = cv2.resize(alpha, (pw, ph), interpolation=cv2.INTER_AREA)
    a = cv2.GaussianBlur(a, (0, 0), 0.8)[..., None]
    out = img.astype(np.float32)
    region = out[py0 : py0 + ph, px0 : px0 + pw]
    out[py0 : py0 + ph, px0 : px0 + pw] = region * (1 - a) + color * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def pose_matrices(n: int = N_FRAMES) -> np.ndarray:
    """Affine [n, 2, 3] of a gentle head sway; speed is zero at frames 0 and n-1."""
    k = np.arange(n)
    u = (1 - np.cos(np.pi * k / (n - 1))) / 2
    ang = 2.2 * np.sin(2 * np.pi * u) + 0.8 * np.sin(4 * np.pi * u + 1.0)
    tx = 5.0 * np.sin(3 * np.pi * u)
    ty = 2.5 * np.sin(4 * np.pi * u + 0.5) - 2.5 * np.sin(0.5)
    sc = 1.0 + 0.015 * np.sin(2 * np.pi * u)
    mats = []
    for a, x, y, s in zip(ang, tx, ty, sc, strict=True):
        m = cv2.getRotationMatrix2D(POSE_CENTRE, float(a), float(s))
        m[:, 2] += (x, y)
        mats.append(m)
    return np.stack(mats)


def crop_rect(m: np.ndarray) -> list[int]:
    def tr(p):
        return m @ np.array([p[0], p[1], 1.0])

    x1 = int(tr(RECT_LEFT)[0])
    x2 = int(tr(RECT_RIGHT)[0])
    y1 = int(tr(RECT_TOP)[1])
    return [x1, y1, x2, y1 + (x2 - x1)]


def jpeg_roundtrip(img: np.ndarray) -> tuple[bytes, np.ndarray]:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes(), cv2.imdecode(buf, cv2.IMREAD_COLOR)


def network_square(frame: np.ndarray, rect) -> np.ndarray:
    x1, y1, x2, y2 = rect
    crop = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    return crop[4:324, 4:324]


def make_avatar(data_dir: Path) -> None:
    base = base_image()
    mats = pose_matrices()
    rects = [crop_rect(m) for m in mats]
    frames_dir = AVATAR_DIR / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for old in frames_dir.glob("*.jpg"):
        old.unlink()
    cache = np.lib.format.open_memmap(
        data_dir / "mouth_cache.npy",
        mode="w+",
        dtype=np.uint8,
        shape=(N_FRAMES, LEVELS, 320, 320, 3),
    )
    for lv in range(LEVELS):
        face = draw_mouth(base, lv / (LEVELS - 1))
        for k, m in enumerate(mats):
            fr = cv2.warpAffine(
                face,
                m,
                (FRAME_SIZE, FRAME_SIZE),
                flags=cv2.INTER_CUBIC,
                borderMode=cv2.BORDER_REFLECT101,
            )
            jpg, dec = jpeg_roundtrip(fr)
            if lv == 0:
                (frames_dir / f"{k}.jpg").write_bytes(jpg)
            cache[k, lv] = network_square(dec, rects[k])
    cache.flush()
    for r in rects:
        assert 0 <= r[0] < r[2] <= FRAME_SIZE and 0 <= r[1] < r[3] <= FRAME_SIZE, r
    (AVATAR_DIR / "crop_rects.json").write_text(json.dumps(rects) + "\n")
    print(f"wrote {N_FRAMES} frames, crop rects and {data_dir / 'mouth_cache.npy'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--skip-speech", action="store_true")
    ap.add_argument("--skip-avatar", action="store_true")
    args = ap.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_avatar:
        make_avatar(args.data_dir)
    if not args.skip_speech:
        clips = make_speech(args.data_dir)
        print(f"wrote {len(clips)} speech clips to {args.data_dir / 'speech'}")
        make_demo_wav()


if __name__ == "__main__":
    main()
