"""Synthetic identities: procedurally drawn faces with exact identity and prompt-attribute labels.

Why: real face datasets and Stable Diffusion weights cannot be downloaded on CPU machines, yet the methods
must be trained and measured end to end. Here an identity is a fixed set of drawn traits (face shape and
proportions, skin tone, eyes, brows, nose, mouth, hair, glasses, a distinctive mark at a fixed place); each
photo of that identity varies pose, lighting and the four *prompt attributes* (expression, gaze/head turn,
background colour and pattern) that its caption states. Everything is deterministic from
(identity id, photo id, seed), so the data never needs to be stored.

Drawing is a tiny vector renderer: every shape is a polygon or polyline in *face units* (head centre at the
origin, head half-height 1, y down), mapped through the photo's similarity transform (position, scale,
rotation) onto a 2x supersampled PIL canvas, then box-filtered down, so rotation and landmarks are exact.

`SynthFaces` implements the random-access face-source protocol of the data pipeline (`__len__`,
`__getitem__ -> record`, `identities`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image, ImageDraw

from fusion_jax.data.configs import SynthFaceConfig

# --------------------------------------------------------------------------------------------------------
# Prompt attributes: one small enum each, stated by the caption and readable back exactly.
# --------------------------------------------------------------------------------------------------------

EXPRESSIONS = ("neutral", "smiling", "surprised")
GAZES = ("camera", "left", "right")  # "left" = the head turns towards the image's left edge
BACKGROUND_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUND_PATTERNS = ("plain", "striped", "dotted", "checkered")

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "expression": EXPRESSIONS,
    "gaze": GAZES,
    "background_colour": BACKGROUND_COLOURS,
    "background_pattern": BACKGROUND_PATTERNS,
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTE_VALUES)

EXPRESSION_PHRASES = {"neutral": "with a neutral expression", "smiling": "smiling", "surprised": "surprised"}
GAZE_PHRASES = {"camera": "looking at the camera", "left": "looking left", "right": "looking right"}
_EXPRESSION_PHRASES, _GAZE_PHRASES = EXPRESSION_PHRASES, GAZE_PHRASES  # older private names, still read elsewhere

# Base RGB of each background colour (chosen far apart in hue so lighting changes never confuse them).
BACKGROUND_RGB = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (230, 210, 50),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (130, 50, 170),
}


@dataclasses.dataclass(frozen=True)
class PromptAttributes:
    """The caption-stated attributes of one photo; None means "not stated" (a free choice when rendering)."""

    expression: str | None = None  # one of EXPRESSIONS
    gaze: str | None = None  # one of GAZES
    background_colour: str | None = None  # one of BACKGROUND_COLOURS
    background_pattern: str | None = None  # one of BACKGROUND_PATTERNS

    def __post_init__(self) -> None:
        for name, allowed in ATTRIBUTE_VALUES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"PromptAttributes.{name} must be one of {allowed} or None, got {value!r}")

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}

    def labels(self) -> np.ndarray:
        """Class index of each attribute in ATTRIBUTE_NAMES order (-1 where not stated), int64 (4,)."""
        return np.array(
            [-1 if getattr(self, n) is None else ATTRIBUTE_VALUES[n].index(getattr(self, n)) for n in ATTRIBUTE_NAMES],
            dtype=np.int64,
        )

    @classmethod
    def from_labels(cls, labels: np.ndarray | list[int]) -> "PromptAttributes":
        """Inverse of `labels` (negative entries mean "not stated")."""
        labels = np.asarray(labels)
        if labels.shape != (len(ATTRIBUTE_NAMES),):
            raise ValueError(f"labels must have shape ({len(ATTRIBUTE_NAMES)},), got {labels.shape}")
        values = {}
        for name, index in zip(ATTRIBUTE_NAMES, labels.tolist()):
            allowed = ATTRIBUTE_VALUES[name]
            if index >= len(allowed):
                raise ValueError(f"label for {name} must be < {len(allowed)}, got {index}")
            values[name] = None if index < 0 else allowed[index]
        return cls(**values)


def build_caption(attributes: PromptAttributes) -> str:
    """'a person smiling, looking left, on a striped blue background'; unstated attributes are left out."""
    parts = []
    if attributes.expression is not None:
        parts.append(EXPRESSION_PHRASES[attributes.expression])
    if attributes.gaze is not None:
        parts.append(GAZE_PHRASES[attributes.gaze])
    if attributes.background_colour is not None or attributes.background_pattern is not None:
        words = [w for w in (attributes.background_pattern, attributes.background_colour) if w is not None]
        parts.append(f"on a {' '.join(words)} background")
    return "a person" + (" " + ", ".join(parts) if parts else "")


def parse_caption(caption: str) -> PromptAttributes:
    """Read the prompt attributes back from a caption written by `build_caption` (or close to it)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.lower()

    def find(phrases: Mapping[str, str]) -> str | None:
        hits = [value for value, phrase in phrases.items() if phrase in text]
        if len(hits) > 1:
            raise ValueError(f"caption {caption!r} states several of {sorted(hits)}")
        return hits[0] if hits else None

    background = re.search(r"on an? ((?:\w+ )*?)background", text)
    colour = pattern = None
    if background:
        for word in background.group(1).split():
            if word in BACKGROUND_COLOURS:
                colour = word
            elif word in BACKGROUND_PATTERNS:
                pattern = word
            else:
                raise ValueError(f"caption {caption!r}: unknown background word {word!r}")
    return PromptAttributes(find(EXPRESSION_PHRASES), find(GAZE_PHRASES), colour, pattern)


# --------------------------------------------------------------------------------------------------------
# Identity traits (fixed per person) and photo parameters (vary per photo).
# --------------------------------------------------------------------------------------------------------

HAIR_STYLES = ("bald", "short", "long", "bun", "afro", "mohawk")
MARK_KINDS = ("none", "mole", "scar", "tattoo")
# Fixed mark anchors in face units (before head turn): cheeks, forehead sides, chin.
_MARK_ANCHORS = ((-0.45, 0.28), (0.45, 0.28), (-0.24, -0.38), (0.24, -0.38), (0.0, 0.8))
_SKIN_TONES = np.array([(255, 226, 200), (236, 190, 150), (198, 140, 100), (140, 90, 60), (90, 58, 40)], float)
_HAIR_COLOURS = np.array(
    [(25, 20, 20), (70, 45, 30), (120, 80, 45), (150, 70, 40), (220, 190, 120), (190, 90, 40), (160, 160, 160),
     (235, 235, 228), (60, 90, 200), (230, 110, 170), (60, 160, 90), (120, 60, 170)], float)
_EYE_COLOURS = np.array(
    [(100, 60, 30), (40, 30, 25), (70, 120, 210), (70, 150, 80), (130, 140, 155), (190, 130, 40), (120, 80, 175)],
    float)
_TATTOO_COLOURS = np.array([(30, 60, 150), (20, 110, 60), (150, 20, 30), (20, 20, 20)], float)
_GLASSES_COLOURS = np.array([(15, 15, 15), (190, 150, 40), (170, 30, 30)], float)


@dataclasses.dataclass(frozen=True)
class IdentityTraits:
    """Everything that makes one synthetic person recognisable; constant over their photos."""

    face_width: float  # head half-width in face units (head half-height is 1)
    face_squareness: float  # superellipse exponent of the head outline (2 = ellipse, 4 = boxy)
    chin_taper: float  # how much narrower the lower face gets (0 = none)
    skin: tuple[float, float, float]  # skin RGB
    eye_y: float  # eye height (face units, negative = above centre)
    eye_spacing: float  # half distance between the eye centres
    eye_width: float  # eye half-width
    eye_openness: float  # eye half-height / half-width (round 0.8 ... narrow 0.35)
    eye_colour: tuple[float, float, float]  # iris RGB
    brow_thickness: float  # eyebrow line width
    brow_arch: float  # rise of the eyebrow middle above its ends
    brow_tilt: float  # outer end minus inner end height (negative = outer end higher)
    nose_style: int  # 0 triangle, 1 line with nostrils, 2 round tip
    nose_length: float  # nose tip height below the eyes
    nose_width: float  # half-width of the nose
    mouth_y: float  # mouth centre height
    mouth_width: float  # mouth half-width
    lip: tuple[float, float, float]  # lip RGB
    hair_style: str  # one of HAIR_STYLES
    hair: tuple[float, float, float]  # hair RGB
    fringe_height: float  # height of the fringe line at the centre of the forehead
    fringe_tilt: float  # slope of the fringe line (side parting)
    glasses: int  # 0 none, else 1 + index into the glasses colours
    mark_kind: str  # one of MARK_KINDS
    mark_position: tuple[float, float]  # mark centre in face units
    mark_size: float  # mark radius / half-length in face units
    mark_angle: float  # orientation of a scar or tattoo (radians)
    mark_colour: tuple[float, float, float]  # mark RGB


def _jitter_colour(rng: np.random.Generator, rgb: np.ndarray, amount: float) -> tuple[float, float, float]:
    return tuple(np.clip(rgb + rng.uniform(-amount, amount, 3), 0, 255).tolist())


def sample_identity(identity_id: int, seed: int = 0) -> IdentityTraits:
    """The traits of person `identity_id` under `seed` (a pure function of both)."""
    rng = np.random.default_rng([int(seed), int(identity_id), 0x1D])
    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    low = int(np.floor(tone))
    high = min(low + 1, len(_SKIN_TONES) - 1)
    skin = _SKIN_TONES[low] * (1 - (tone - low)) + _SKIN_TONES[high] * (tone - low)
    skin_rgb = np.array(_jitter_colour(rng, skin, 10))
    lip = skin_rgb * rng.uniform(0.35, 0.6) + np.array((180, 60, 70)) * rng.uniform(0.3, 0.55)
    hair_style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    mark_kind = MARK_KINDS[rng.choice(len(MARK_KINDS), p=(0.25, 0.3, 0.2, 0.25))]
    anchor = np.array(_MARK_ANCHORS[rng.integers(len(_MARK_ANCHORS))]) + rng.uniform(-0.04, 0.04, 2)
    if mark_kind == "mole":
        mark_colour, mark_size = np.array((55, 32, 24)), rng.uniform(0.06, 0.08)
    elif mark_kind == "scar":
        mark_colour, mark_size = skin_rgb * 0.45 + np.array((160, 50, 50)) * 0.55, rng.uniform(0.14, 0.2)
    else:
        mark_colour = _TATTOO_COLOURS[rng.integers(len(_TATTOO_COLOURS))]
        mark_size = rng.uniform(0.1, 0.13)
    eye_width = rng.uniform(0.11, 0.16)
    return IdentityTraits(
        face_width=rng.uniform(0.68, 0.9),
        face_squareness=rng.uniform(2.0, 4.0),
        chin_taper=rng.uniform(0.0, 0.3),
        skin=tuple(skin_rgb.tolist()),
        eye_y=rng.uniform(-0.15, 0.0),
        eye_spacing=rng.uniform(0.27, 0.38),
        eye_width=eye_width,
        eye_openness=rng.uniform(0.35, 0.8),
        eye_colour=_jitter_colour(rng, _EYE_COLOURS[rng.integers(len(_EYE_COLOURS))], 15),
        brow_thickness=rng.uniform(0.035, 0.085),
        brow_arch=rng.uniform(0.0, 0.08),
        brow_tilt=rng.uniform(-0.1, 0.08),
        nose_style=int(rng.integers(3)),
        nose_length=rng.uniform(0.25, 0.4),
        nose_width=rng.uniform(0.07, 0.14),
        mouth_y=rng.uniform(0.47, 0.6),
        mouth_width=rng.uniform(0.17, 0.28),
        lip=tuple(np.clip(lip, 0, 255).tolist()),
        hair_style=hair_style,
        hair=_jitter_colour(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 18),
        fringe_height=rng.uniform(-0.75, -0.52),
        fringe_tilt=rng.uniform(-0.3, 0.3),
        glasses=int(rng.integers(1, len(_GLASSES_COLOURS) + 1)) if rng.random() < 0.2 else 0,
        mark_kind=mark_kind,
        mark_position=(float(anchor[0]), float(anchor[1])),
        mark_size=float(mark_size),
        mark_angle=rng.uniform(0, np.pi),
        mark_colour=tuple(np.asarray(mark_colour, float).tolist()),
    )


@dataclasses.dataclass(frozen=True)
class PhotoParams:
    """What varies from photo to photo of the same person."""

    attributes: PromptAttributes  # all four prompt attributes, each stated
    centre: tuple[float, float]  # head centre, as a fraction of the image size
    scale: float  # head half-height as a fraction of the image size
    rotation: float  # in-plane head rotation (radians, positive = clockwise on screen)
    brightness: float  # global light level multiplier
    light_angle: float  # direction the light gradient comes from (radians)
    light_strength: float  # light gradient amplitude across the image
    tint: tuple[float, float, float]  # per-channel colour cast of the light
    clothing: tuple[float, float, float]  # shirt RGB
    background_shade: float  # lightness multiplier of the background base colour
    pattern_period: float  # pattern period as a fraction of the image size
    pattern_angle: float  # pattern orientation (radians)
    pattern_phase: tuple[float, float]  # pattern offset, fractions of one period


def sample_photo(
    identity_id: int, photo_id: int, seed: int = 0, attributes: PromptAttributes | None = None
) -> PhotoParams:
    """Photo parameters of (identity, photo, seed); stated `attributes` override the sampled ones.

    The prompt attributes are drawn first from their own stream, so overriding them leaves pose, lighting
    and pattern geometry unchanged: the same photo id renders the same scene with a different prompt.
    """
    attr_rng = np.random.default_rng([int(seed), int(identity_id), int(photo_id), 0xA7])
    sampled = {name: values[attr_rng.integers(len(values))] for name, values in ATTRIBUTE_VALUES.items()}
    if attributes is not None:
        sampled.update({k: v for k, v in attributes.as_dict().items() if v is not None})
    rng = np.random.default_rng([int(seed), int(identity_id), int(photo_id), 0x9E])
    return PhotoParams(
        attributes=PromptAttributes(**sampled),
        centre=(0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.04, 0.05)),
        scale=rng.uniform(0.22, 0.27),
        rotation=rng.uniform(-0.2, 0.2),
        brightness=rng.uniform(0.82, 1.12),
        light_angle=rng.uniform(0, 2 * np.pi),
        light_strength=rng.uniform(0.0, 0.22),
        tint=tuple((1 + rng.uniform(-0.04, 0.04, 3)).tolist()),
        clothing=tuple(rng.uniform(30, 230, 3).tolist()),
        background_shade=rng.uniform(0.85, 1.1),
        pattern_period=rng.uniform(0.12, 0.17),
        pattern_angle=rng.uniform(0, np.pi),
        pattern_phase=tuple(rng.uniform(0, 1, 2).tolist()),
    )


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _head_outline(traits: IdentityTraits, n: int = 48) -> np.ndarray:
    """Superellipse head, narrowing towards the chin."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / traits.face_squareness
    x = np.sign(c) * np.abs(c) ** e * traits.face_width
    y = np.sign(s) * np.abs(s) ** e
    x = x * (1 - traits.chin_taper * np.clip(y, 0, None) ** 2)
    return np.stack([x, y], axis=1)


def _cap(rx: float, ry: float, cy: float, line_y: float, line_slope: float) -> np.ndarray:
    """Hair cap: the part of an ellipse above the line y = line_y + line_slope * x."""
    points = _ellipse(0.0, cy, rx, ry, 48)
    points[:, 1] = np.minimum(points[:, 1], line_y + line_slope * points[:, 0])
    return points


def _star(cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    t = angle + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _rgb(colour: Any) -> tuple[int, int, int]:
    return tuple(int(round(min(max(c, 0), 255))) for c in colour)


class _FaceCanvas:
    """Draws shapes given in face units through the photo's similarity transform."""

    def __init__(self, image: Image.Image, matrix: np.ndarray, units_to_px: float):
        self.draw = ImageDraw.Draw(image)
        self.matrix = matrix  # (2, 3): face units -> supersampled pixel-index coordinates
        self.units_to_px = units_to_px

    def _px(self, points: np.ndarray) -> list[tuple[float, float]]:
        points = np.asarray(points, float).reshape(-1, 2)
        mapped = points @ self.matrix[:, :2].T + self.matrix[:, 2]
        return [tuple(p) for p in mapped.tolist()]

    def polygon(self, points: np.ndarray, colour: Any) -> None:
        self.draw.polygon(self._px(points), fill=_rgb(colour))

    def line(self, points: np.ndarray, width: float, colour: Any, closed: bool = False) -> None:
        points = np.asarray(points, float)
        if closed:
            points = np.concatenate([points, points[:1]])
        w = max(1, int(round(width * self.units_to_px)))
        self.draw.line(self._px(points), fill=_rgb(colour), width=w, joint="curve")


def _draw_person(canvas: _FaceCanvas, traits: IdentityTraits, photo: PhotoParams) -> np.ndarray:
    """Draws one person; returns the 5 landmarks (eyes, nose tip, mouth corners) in face units."""
    attrs = photo.attributes
    turn = {"camera": 0.0, "left": -1.0, "right": 1.0}[attrs.gaze]
    w = traits.face_width
    skin = np.array(traits.skin)
    hair = np.array(traits.hair)
    style = traits.hair_style

    # Behind the head: back hair, shoulders, neck, ears.
    if style == "short":
        canvas.polygon(_ellipse(0, -0.12, w * 1.1, 0.98), hair)
    elif style == "long":
        canvas.polygon(_ellipse(0, -0.05, w * 1.18, 1.06), hair)
        canvas.polygon(np.array([[-w * 1.18, -0.1], [w * 1.18, -0.1], [w * 1.1, 1.45], [-w * 1.1, 1.45]]), hair)
    elif style == "bun":
        canvas.polygon(_ellipse(0, -1.12, 0.32, 0.28), hair)
        canvas.polygon(_ellipse(0, -0.1, w * 1.06, 0.97), hair)
    elif style == "afro":
        canvas.polygon(_ellipse(0, -0.28, 1.22, 1.18, 40), hair)
    canvas.polygon(_ellipse(0, 2.25, 1.55, 0.85, 40), photo.clothing)
    canvas.polygon(np.array([[-0.3 * w, 0.5], [0.3 * w, 0.5], [0.33 * w, 1.55], [-0.33 * w, 1.55]]), skin * 0.85)
    for side in (-1, 1):
        canvas.polygon(_ellipse(side * w * 0.97 - 0.06 * turn, 0.0, 0.12, 0.2), skin * 0.9)

    canvas.polygon(_head_outline(traits), skin)

    # Distinctive mark (moves a little with the head turn, like the other features).
    mx, my = traits.mark_position
    mx += turn * 0.12 * w
    if traits.mark_kind == "mole":
        canvas.polygon(_ellipse(mx, my, traits.mark_size, traits.mark_size, 12), traits.mark_colour)
    elif traits.mark_kind == "scar":
        d = np.array([np.cos(traits.mark_angle), np.sin(traits.mark_angle)]) * traits.mark_size
        canvas.line(np.array([[mx, my] - d, [mx, my] + d]), 0.045, traits.mark_colour)
        for f in (-0.5, 0.0, 0.5):
            c = np.array([mx, my]) + f * d
            n = np.array([-d[1], d[0]]) * 0.35
            canvas.line(np.array([c - n, c + n]), 0.03, traits.mark_colour)
    elif traits.mark_kind == "tattoo":
        canvas.polygon(_star(mx, my, traits.mark_size, traits.mark_angle), traits.mark_colour)

    # Front hair.
    if style in ("short", "long", "afro"):
        canvas.polygon(_cap(w * 1.06, 1.04, -0.02, traits.fringe_height, traits.fringe_tilt), hair)
    elif style == "bun":
        canvas.polygon(_cap(w * 1.04, 1.03, -0.02, traits.fringe_height - 0.12, 0.0), hair)
    elif style == "mohawk":
        canvas.polygon(np.array([[-0.16, -1.38], [0.16, -1.38], [0.13, -0.55], [-0.13, -0.55]]), hair)

    # Eyes: the eye on the side the head turns to is foreshortened; irises follow the gaze.
    eye_open = traits.eye_openness * {"neutral": 1.0, "smiling": 0.75, "surprised": 1.35}[attrs.expression]
    eye_ry = traits.eye_width * min(eye_open, 0.95)
    eye_centres = []
    for side in (-1, 1):
        ex = side * traits.eye_spacing + turn * 0.17 * w
        erx = traits.eye_width * (0.75 if side == turn else 1.0)
        eye_centres.append((ex, traits.eye_y))
        canvas.polygon(_ellipse(ex, traits.eye_y, erx, eye_ry, 20), (245, 245, 240))
        iris_r = min(eye_ry * 0.95, erx * 0.6)
        ix = ex + turn * 0.5 * (erx - iris_r)
        canvas.polygon(_ellipse(ix, traits.eye_y, iris_r, min(iris_r, eye_ry), 16), traits.eye_colour)
        canvas.polygon(_ellipse(ix, traits.eye_y, iris_r * 0.45, min(iris_r, eye_ry) * 0.45, 10), (15, 15, 15))
        # Eyebrow: inner end, arched middle, outer end.
        lift = {"neutral": 0.0, "smiling": 0.02, "surprised": 0.1}[attrs.expression]
        by = traits.eye_y - eye_ry - 0.09 - lift
        brow = np.array([
            [ex - side * traits.eye_width * 0.9, by],
            [ex + side * traits.eye_width * 0.1, by - traits.brow_arch - 0.4 * lift],
            [ex + side * traits.eye_width * 1.1, by + traits.brow_tilt],
        ])
        canvas.line(brow, traits.brow_thickness, hair * 0.7)
        if traits.glasses:
            frame = _GLASSES_COLOURS[traits.glasses - 1]
            canvas.line(_ellipse(ex, traits.eye_y, traits.eye_width * 1.5, traits.eye_width * 1.2, 20), 0.04, frame,
                        closed=True)
    if traits.glasses:
        frame = _GLASSES_COLOURS[traits.glasses - 1]
        (lx, ly), (rx, _) = eye_centres
        canvas.line(np.array([[lx + traits.eye_width * 1.5, ly], [rx - traits.eye_width * 1.5, ly]]), 0.04, frame)

    # Nose: the tip moves furthest with the head turn.
    tip_x = turn * 0.26 * w
    tip_y = traits.eye_y + traits.nose_length
    base_x = turn * 0.17 * w
    nose_colour = skin * 0.78
    nw = traits.nose_width
    if traits.nose_style == 0:
        canvas.polygon(np.array([[base_x, traits.eye_y + 0.05], [tip_x + nw, tip_y], [tip_x - nw, tip_y]]), nose_colour)
    elif traits.nose_style == 1:
        canvas.line(np.array([[base_x + 0.03 * turn, traits.eye_y + 0.05], [tip_x, tip_y]]), 0.04, nose_colour)
        for side in (-1, 1):
            canvas.polygon(_ellipse(tip_x + side * nw * 0.7, tip_y, nw * 0.35, nw * 0.25, 10), skin * 0.6)
    else:
        canvas.polygon(_ellipse(tip_x, tip_y - 0.02, nw, nw * 0.8, 16), nose_colour)

    # Mouth: the expression's main cue.
    cx = turn * 0.15 * w
    cy = traits.mouth_y
    mw = traits.mouth_width
    lip = np.array(traits.lip)
    if attrs.expression == "neutral":
        xs = np.linspace(-mw, mw, 9)
        canvas.line(np.stack([cx + xs, cy + 0.02 * (xs / mw) ** 2], axis=1), 0.065, lip)
        corners = [(cx - mw, cy + 0.02), (cx + mw, cy + 0.02)]
    elif attrs.expression == "smiling":
        mw = mw * 1.15
        xs = np.linspace(-mw, mw, 13)
        bow = 1 - (xs / mw) ** 2
        top = np.stack([cx + xs, cy - 0.07 + 0.06 * bow], axis=1)
        bottom = np.stack([cx + xs, cy - 0.07 + 0.24 * bow], axis=1)[::-1]
        canvas.polygon(np.concatenate([top, bottom]), lip * 0.55)
        teeth_edge = np.stack([cx + xs, cy - 0.07 + 0.13 * bow], axis=1)[::-1]
        canvas.polygon(np.concatenate([top, teeth_edge]), (245, 245, 240))
        canvas.line(np.concatenate([top, bottom, top[:1]]), 0.035, lip)
        corners = [(cx - mw, cy - 0.07), (cx + mw, cy - 0.07)]
    else:  # surprised
        ring = _ellipse(cx, cy + 0.03, 0.11, 0.15, 20)
        canvas.polygon(ring, (70, 25, 30))
        canvas.line(ring, 0.045, lip, closed=True)
        corners = [(cx - 0.11, cy + 0.03), (cx + 0.11, cy + 0.03)]

    return np.array([eye_centres[0], eye_centres[1], (tip_x, tip_y), corners[0], corners[1]], float)


def _background(size: int, colour: str, pattern: str, photo: PhotoParams) -> np.ndarray:
    """(size, size, 3) float background: base colour plus a darker pattern of the same hue."""
    base = np.array(BACKGROUND_RGB[colour], float) * photo.background_shade
    second = base * 0.55
    period = photo.pattern_period * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c, s = np.cos(photo.pattern_angle), np.sin(photo.pattern_angle)
    u = (x * c + y * s) / period + photo.pattern_phase[0]
    v = (-x * s + y * c) / period + photo.pattern_phase[1]
    if pattern == "plain":
        mask = np.zeros((size, size), bool)
    elif pattern == "striped":
        mask = (u % 1.0) < 0.5
    elif pattern == "dotted":
        mask = (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 < 0.27**2
    else:  # checkered
        mask = (np.floor(u) + np.floor(v)) % 2 == 0
    return np.where(mask[..., None], second, base)


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    """3x3 matrix of p -> scale * R(angle) p + t."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1]], float)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def caption_attributes(identity_id: int, photo_id: int, config: SynthFaceConfig, attrs: PromptAttributes
                       ) -> PromptAttributes:
    """The attributes a photo's caption states: all of `attrs`, or without the background for the photos that
    `config.caption_background_dropout` picks (its own random stream per photo: nothing else changes)."""
    p = config.caption_background_dropout
    if p <= 0.0 or np.random.default_rng([int(config.seed), int(identity_id), int(photo_id), 0xCB]).random() >= p:
        return attrs
    return dataclasses.replace(attrs, background_colour=None, background_pattern=None)


def render_face(
    identity_id: int,
    photo_id: int,
    config: SynthFaceConfig = SynthFaceConfig(),
    attributes: PromptAttributes | None = None,
) -> dict[str, Any]:
    """One photo of one person as a face record; stated `attributes` fix those prompt attributes.

    Keys: image uint8 (S, S, 3); face_crop uint8 (C, C, 3), the head cut out upright and centred (exact
    geometry, no detector); face_box float32 [x0, y0, x1, y1] of the head outline and landmarks float32 (5, 2)
    (image-left eye, image-right eye, nose tip, mouth corners), both in pixel-index coordinates (pixel centres
    at integers); embedding float32 (512,): zeros with has_embedding False, or with
    `config.recognition_embedding` the ArcFace stand-in of `synth_recognition`; identity, photo_id int64; caption
    str (the attributes `caption_attributes` states); attributes dict (all four); attribute_labels int64 (4,).
    """
    traits = sample_identity(identity_id, config.seed)
    photo = sample_photo(identity_id, photo_id, config.seed, attributes)
    size, k = config.image_size, config.supersample
    big = size * k

    # Face units -> output continuous coordinates (pixel i spans [i, i+1)).
    to_image = _similarity(photo.scale * size, photo.rotation, photo.centre[0] * size, photo.centre[1] * size)
    # Output continuous -> supersampled pixel-index coordinates (what PIL draws in).
    to_big_index = np.array([[k, 0, -0.5], [0, k, -0.5], [0, 0, 1]], float)

    attrs = photo.attributes
    canvas_image = Image.fromarray(
        np.clip(_background(big, attrs.background_colour, attrs.background_pattern, photo), 0, 255).astype(np.uint8))
    canvas = _FaceCanvas(canvas_image, (to_big_index @ to_image)[:2], photo.scale * big)
    landmarks_units = _draw_person(canvas, traits, photo)

    # Lighting: brightness, a linear gradient and a colour cast, on the supersampled image.
    pixels = np.asarray(canvas_image, np.float32)
    y, x = (np.mgrid[0:big, 0:big].astype(np.float32) + 0.5) / big - 0.5
    gradient = 1.0 + photo.light_strength * (x * np.cos(photo.light_angle) + y * np.sin(photo.light_angle)) * 2
    pixels = pixels * (photo.brightness * gradient)[..., None] * np.array(photo.tint, np.float32)
    pixels = np.clip(pixels, 0, 255)
    image = pixels.reshape(size, k, size, k, 3).mean(axis=(1, 3))

    # Aligned crop: face units -> crop continuous coordinates, centred slightly above the head centre.
    crop = config.face_crop_size
    units_to_crop = _similarity(crop / config.crop_extent, 0.0, crop / 2, crop / 2 + 0.12 * crop / config.crop_extent)
    big_crop_from_big = (
        np.array([[k, 0, -0.5], [0, k, -0.5], [0, 0, 1]], float)
        @ units_to_crop
        @ np.linalg.inv(to_image)
        @ np.array([[1 / k, 0, 0.5 / k], [0, 1 / k, 0.5 / k], [0, 0, 1]], float)
    )
    face_big = cv2.warpAffine(pixels, big_crop_from_big[:2].astype(np.float64), (crop * k, crop * k),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    face_crop = face_big.reshape(crop, k, crop, k, 3).mean(axis=(1, 3))

    head = _apply(to_image, _head_outline(traits))
    landmarks = _apply(to_image, landmarks_units) - 0.5
    if config.recognition_embedding:
        from fusion_jax.data.synth_recognition import photo_embedding

        embedding, has_embedding = photo_embedding(traits, identity_id, photo_id, config), np.bool_(True)
    else:
        embedding, has_embedding = np.zeros((512,), np.float32), np.bool_(False)
    return {
        "image": np.round(image).astype(np.uint8),
        "face_crop": np.round(face_crop).astype(np.uint8),
        "face_box": np.concatenate([head.min(axis=0), head.max(axis=0)]).astype(np.float32) - 0.5,
        "landmarks": landmarks.astype(np.float32),
        "embedding": embedding,
        "has_embedding": has_embedding,
        "identity": np.int64(identity_id),
        "photo_id": np.int64(photo_id),
        "caption": build_caption(caption_attributes(identity_id, photo_id, config, attrs)),
        "attributes": attrs.as_dict(),
        "attribute_labels": attrs.labels(),
    }


class SynthFaces:
    """Random-access face source over one split of the synthetic identities.

    Index i is photo `i % photos_per_identity` of the split's identity `i // photos_per_identity`.
    Splits: "train" = ids [0, num_train), "heldout" = the next num_heldout ids, "all" = both.
    Records (see `render_face`) carry the face-record keys of `fusion_jax.data.sources` plus the ground truth
    `attributes` (dict attribute name -> value) and `attribute_labels` (int64 (4,), ATTRIBUTE_NAMES order).
    """

    def __init__(self, config: SynthFaceConfig = SynthFaceConfig(), split: str = "train"):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        self.config = config
        self.split = split
        self.identity_ids = split_identity_ids(config, split)
        if len(self.identity_ids) == 0:
            raise ValueError(f"split {split!r} has no identities under {config}")
        self.identities = np.repeat(self.identity_ids, config.photos_per_identity)
        self.photo_ids = np.tile(np.arange(config.photos_per_identity, dtype=np.int64), len(self.identity_ids))

    def __len__(self) -> int:
        return len(self.identities)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} photos")
        index = int(index) % len(self)
        return render_face(int(self.identities[index]), int(self.photo_ids[index]), self.config)

    def render(self, identity_id: int, photo_id: int, attributes: PromptAttributes | None = None) -> dict[str, Any]:
        """Any photo of any identity (also outside this split), with chosen prompt attributes."""
        return render_face(identity_id, photo_id, self.config, attributes)


def split_identity_ids(config: SynthFaceConfig, split: str) -> np.ndarray:
    """Identity ids of a split, int64."""
    train = np.arange(config.num_train_identities, dtype=np.int64)
    heldout = np.arange(config.num_heldout_identities, dtype=np.int64) + config.num_train_identities
    return {"train": train, "heldout": heldout, "all": np.concatenate([train, heldout])}[split]


def render_batch(
    identity_ids: np.ndarray, photo_ids: np.ndarray, config: SynthFaceConfig = SynthFaceConfig(),
    key: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Stack of one record field (default the images) for paired id arrays, and the attribute labels (N, 4)."""
    records = [render_face(int(i), int(p), config) for i, p in zip(identity_ids, photo_ids)]
    return np.stack([r[key] for r in records]), np.stack([r["attribute_labels"] for r in records])
