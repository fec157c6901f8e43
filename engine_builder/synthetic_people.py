"""Deterministic synthetic person crops, so demos, tests, training and load tests need no download.

An identity is a set of attributes a re-identification model has to pick up: upper-body colour and
pattern (plain, horizontal or vertical stripes, checks, a chest logo only seen from the front, an
open jacket), sleeve length, trousers/shorts/skirt, shoes, hair colour and length, skin tone, a
carried item (backpack, shoulder bag, handbag) and body proportions. Colours come from a small
palette of clothing colours, so many people share their main colours and the details matter.

A camera is what the model has to see through: its own background, illumination, colour cast,
gamma, sensor noise, blur, resolution, how tightly the detector box fits (scale), which way people
usually walk past it (front, back or side views) and how often something occludes them.

A shot is one frame of a tracklet: the same person under the same camera keeps the viewpoint of
that tracklet (with an occasional turn), and changes stride, position and occlusion.
The same (identity, camera, shot, seed) always gives the same pixels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CROP_WIDTH, CROP_HEIGHT = 64, 128  # Market-1501's detector boxes
_SUPERSAMPLE = 2  # drawn at 2x and reduced, so edges are anti-aliased like a camera's

RGB = tuple[int, int, int]

UPPER_COLOURS: dict[str, RGB] = {
    "white": (225, 225, 220), "black": (30, 30, 32), "grey": (128, 128, 128), "red": (180, 30, 35),
    "blue": (40, 80, 185), "navy": (25, 35, 80), "light blue": (140, 180, 220), "green": (40, 130, 60),
    "yellow": (220, 195, 50), "orange": (225, 120, 35), "pink": (225, 140, 170), "purple": (110, 50, 140),
    "brown": (110, 70, 40), "beige": (200, 180, 140),
}
LOWER_COLOURS: dict[str, RGB] = {
    "black": (30, 30, 32), "navy": (30, 40, 80), "denim": (70, 95, 140), "grey": (110, 110, 112),
    "beige": (190, 170, 130), "brown": (95, 65, 40), "white": (215, 215, 210), "olive": (95, 100, 50),
    "red": (150, 35, 40),
}
SKIN_TONES: tuple[RGB, ...] = ((240, 205, 180), (220, 180, 140), (190, 145, 105), (150, 105, 70), (100, 70, 45))
HAIR_COLOURS: tuple[RGB, ...] = ((20, 18, 16), (70, 45, 25), (120, 85, 50), (200, 170, 110), (150, 150, 150), (140, 60, 30))
UPPER_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo", "jacket")
LOWER_KINDS = ("trousers", "trousers", "shorts", "skirt")
BAG_KINDS = ("none", "none", "backpack", "shoulder", "handbag")
VIEWS = ("front", "back", "side")


@dataclass(frozen=True)
class Identity:
    skin: RGB
    hair: RGB
    long_hair: bool
    upper: RGB
    upper_pattern: str
    upper_detail: RGB  # stripes, checks, logo, or the shirt under an open jacket
    long_sleeves: bool
    lower: RGB
    lower_kind: str
    shoes: RGB
    bag_kind: str
    bag: RGB
    height_scale: float
    width_scale: float
    leg_ratio: float


@dataclass(frozen=True)
class Camera:
    wall: RGB
    floor: RGB
    horizon: float  # fraction of the crop height where the wall meets the floor
    panels: int  # vertical panel lines on the wall
    panel: RGB
    brightness: float
    cast: tuple[float, float, float]
    gamma: float
    contrast: float
    noise: float
    blur: float
    resolution: float  # fraction of the crop's resolution the sensor actually resolves
    person_scale: float  # person height / box height: how tightly the detector boxes people
    view_weights: tuple[float, float, float]  # front, back, side
    occlusion: float  # probability that a shot is partly occluded


def _jitter(rng: np.random.Generator, colour: RGB, amount: int) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _pick(rng: np.random.Generator, palette: dict[str, RGB], amount: int = 14) -> RGB:
    return _jitter(rng, list(palette.values())[rng.integers(len(palette))], amount)


def make_identity(identity: int, seed: int = 0) -> Identity:
    rng = np.random.default_rng([seed, identity, 1])
    upper = _pick(rng, UPPER_COLOURS)
    detail = _pick(rng, UPPER_COLOURS)
    while sum(abs(a - b) for a, b in zip(upper, detail)) < 90:  # a pattern must be visible
        detail = _pick(rng, UPPER_COLOURS)
    return Identity(
        skin=_jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 10),
        hair=_jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 10),
        long_hair=bool(rng.random() < 0.35),
        upper=upper,
        upper_pattern=UPPER_PATTERNS[rng.integers(len(UPPER_PATTERNS))],
        upper_detail=detail,
        long_sleeves=bool(rng.random() < 0.5),
        lower=_pick(rng, LOWER_COLOURS),
        lower_kind=LOWER_KINDS[rng.integers(len(LOWER_KINDS))],
        shoes=_pick(rng, {"black": (25, 25, 25), "white": (220, 220, 220), "brown": (90, 60, 35), "red": (170, 40, 40)}),
        bag_kind=BAG_KINDS[rng.integers(len(BAG_KINDS))],
        bag=_pick(rng, UPPER_COLOURS),
        height_scale=float(rng.uniform(0.88, 1.04)),
        width_scale=float(rng.uniform(0.8, 1.2)),
        leg_ratio=float(rng.uniform(0.92, 1.08)),
    )


def make_camera(camera: int, seed: int = 0) -> Camera:
    rng = np.random.default_rng([seed, camera, 2])
    weights = rng.dirichlet((1.0, 1.0, 1.0)) + 0.1  # every camera sees every view sometimes
    return Camera(
        wall=tuple(int(v) for v in rng.integers(50, 210, size=3)),
        floor=tuple(int(v) for v in rng.integers(40, 180, size=3)),
        horizon=float(rng.uniform(0.45, 0.8)),
        panels=int(rng.integers(0, 6)),
        panel=tuple(int(v) for v in rng.integers(30, 230, size=3)),
        brightness=float(rng.uniform(0.6, 1.3)),
        cast=tuple(float(v) for v in rng.uniform(0.78, 1.22, size=3)),
        gamma=float(rng.uniform(0.8, 1.25)),
        contrast=float(rng.uniform(0.75, 1.15)),
        noise=float(rng.uniform(2.0, 8.0)),
        blur=float(rng.uniform(0.0, 1.3)),
        resolution=float(rng.uniform(0.45, 1.0)),
        person_scale=float(rng.uniform(0.78, 0.96)),
        view_weights=tuple(float(w) for w in weights / weights.sum()),
        occlusion=float(rng.uniform(0.0, 0.35)),
    )


def tracklet_view(identity: int, camera: int, shot: int, seed: int = 0) -> tuple[str, bool]:
    """The view of `identity` in this shot, and whether it faces left: fixed per tracklet, with occasional turns."""
    view_weights = make_camera(camera, seed).view_weights
    tracklet = np.random.default_rng([seed, identity, camera, 4])
    view, facing_left = VIEWS[tracklet.choice(3, p=view_weights)], bool(tracklet.random() < 0.5)
    turn = np.random.default_rng([seed, identity, camera, shot, 5])
    if turn.random() < 0.15:
        view = VIEWS[turn.choice(3, p=view_weights)]
    return view, facing_left


def draw_background(camera: Camera, rng: np.random.Generator) -> Image.Image:
    """The camera's scene behind the box; the box's position in the frame shifts it a little per shot."""
    width, height = CROP_WIDTH * _SUPERSAMPLE, CROP_HEIGHT * _SUPERSAMPLE
    image = Image.new("RGB", (width, height), camera.wall)
    draw = ImageDraw.Draw(image)
    horizon = int(height * (camera.horizon + rng.uniform(-0.05, 0.05)))
    draw.rectangle([0, horizon, width, height], fill=camera.floor)
    offset = rng.uniform(0, width)
    for index in range(camera.panels):
        x = (offset + index * width / max(camera.panels, 1)) % width
        draw.rectangle([x, 0, x + 3 * _SUPERSAMPLE, horizon], fill=camera.panel)
    for _ in range(int(rng.integers(1, 4))):  # clutter: signs, bins, parts of the scene
        x0, y0 = rng.uniform(-10, width), rng.uniform(0, height)
        draw.rectangle([x0, y0, x0 + rng.uniform(8, 40), y0 + rng.uniform(8, 60)], fill=_jitter(rng, camera.panel, 60))
    return image


def _draw_person(person: Identity, view: str, height: float, rng: np.random.Generator) -> Image.Image:
    """The person on a transparent layer, facing right when seen from the side."""
    width_px, height_px = CROP_WIDTH * _SUPERSAMPLE, CROP_HEIGHT * _SUPERSAMPLE
    layer = Image.new("RGBA", (width_px, height_px), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    top = (height_px - height) * rng.uniform(0.25, 0.75)
    cx = width_px / 2 + rng.uniform(-0.06, 0.06) * width_px

    def y(fraction: float) -> float:
        return top + fraction * height

    side = view == "side"
    half = 0.12 * height * person.width_scale * (0.62 if side else 1.0)
    hip = 0.47 + 0.46 * (1 - person.leg_ratio) * 0.5
    foot = 0.93
    stride = rng.uniform(-0.07, 0.07) * height * (1.6 if side else 0.5)
    leg = 0.055 * height * person.width_scale

    # Legs: lower garment to the knee (shorts, skirt) or the ankle (trousers), skin below.
    for sign in (-1.0, 1.0):
        hip_x = cx + sign * (0.3 if side else 0.5) * half
        foot_x = hip_x + sign * stride
        covered = foot if person.lower_kind == "trousers" else hip + (foot - hip) * 0.45
        knee_x = hip_x + (foot_x - hip_x) * (covered - hip) / (foot - hip)
        draw.polygon([(hip_x - leg, y(hip)), (hip_x + leg, y(hip)), (knee_x + leg, y(covered)), (knee_x - leg, y(covered))], fill=person.lower)
        if covered < foot:
            draw.polygon([(knee_x - leg * 0.8, y(covered)), (knee_x + leg * 0.8, y(covered)), (foot_x + leg * 0.8, y(foot)), (foot_x - leg * 0.8, y(foot))], fill=person.skin)
        toe = leg * (2.2 if side else 1.2)
        draw.rectangle([foot_x - leg * 1.1, y(foot), foot_x + toe, y(foot + 0.04)], fill=person.shoes)
    if person.lower_kind == "skirt":
        draw.polygon([(cx - half * 0.9, y(hip - 0.02)), (cx + half * 0.9, y(hip - 0.02)), (cx + half * 1.3, y(hip + 0.2)), (cx - half * 1.3, y(hip + 0.2))], fill=person.lower)

    # Back-side items first, so the torso hides them where it should.
    if person.bag_kind == "backpack" and side:
        draw.rectangle([cx - half - 0.08 * height, y(0.17), cx - half + 2, y(0.4)], fill=person.bag)

    # Torso with its pattern.
    torso = [cx - half, y(0.14), cx + half, y(hip)]
    draw.rounded_rectangle(torso, radius=0.03 * height, fill=person.upper)
    pattern, detail = person.upper_pattern, person.upper_detail
    step = 0.045 * height
    if pattern in ("hstripes", "checks"):
        row = y(0.17)
        while row < y(hip) - 2:
            draw.rectangle([torso[0], row, torso[2], row + step * 0.4], fill=detail)
            row += step
    if pattern in ("vstripes", "checks"):
        column = torso[0] + step * 0.3
        while column < torso[2] - 2:
            draw.rectangle([column, torso[1] + 3, column + step * 0.4, torso[3]], fill=detail)
            column += step
    if pattern == "logo" and view == "front":
        draw.rectangle([cx - 0.05 * height, y(0.2), cx + 0.05 * height, y(0.29)], fill=detail)
    if pattern == "jacket" and view == "front":
        draw.rectangle([cx - half * 0.35, y(0.15), cx + half * 0.35, y(hip)], fill=detail)

    # Arms: sleeves in the upper colour, skin below short sleeves.
    arm = 0.045 * height * person.width_scale
    sleeve_end = 0.45 if person.long_sleeves else 0.26
    arm_xs = (cx + rng.uniform(-0.3, 0.3) * half,) if side else (cx - half - arm, cx + half + arm)
    for arm_x in arm_xs:
        draw.rectangle([arm_x - arm, y(0.15), arm_x + arm, y(sleeve_end)], fill=person.upper)
        draw.rectangle([arm_x - arm * 0.8, y(sleeve_end), arm_x + arm * 0.8, y(0.49)], fill=person.skin)

    # Front-side parts of carried items.
    bag_x = arm_xs[-1]
    if person.bag_kind == "backpack" and view == "back":
        draw.rectangle([cx - half * 0.75, y(0.17), cx + half * 0.75, y(0.41)], fill=person.bag)
    elif person.bag_kind == "backpack" and view == "front":
        for sign in (-1, 1):
            draw.rectangle([cx + sign * half * 0.55 - 2, y(0.14), cx + sign * half * 0.55 + 2, y(0.33)], fill=person.bag)
    elif person.bag_kind == "shoulder":
        if not side:
            draw.line([(cx - half, y(0.15)), (cx + half, y(0.42))], fill=person.bag, width=max(2, int(0.012 * height)))
        draw.rectangle([bag_x - 0.02 * height, y(0.4), bag_x + 0.08 * height, y(0.52)], fill=person.bag)
    elif person.bag_kind == "handbag":
        draw.rectangle([bag_x - 0.04 * height, y(0.48), bag_x + 0.04 * height, y(0.57)], fill=person.bag)

    # Head: face from the front, hair all over from the back, half and half from the side.
    head = 0.05 * height
    head_box = [cx - head, y(0.005), cx + head, y(0.125)]
    draw.ellipse(head_box, fill=person.hair if view == "back" else person.skin)
    if view == "front":
        draw.chord(head_box, 180, 360, fill=person.hair)
    elif side:
        draw.pieslice(head_box, 90, 300, fill=person.hair)
    if person.long_hair:
        hair_x = (cx - head * 1.1, cx - head * 0.2) if side else (cx - head * 1.1, cx + head * 1.1)
        hair_bottom = y(0.24) if view != "front" else y(0.16)
        draw.rectangle([hair_x[0], y(0.06), hair_x[1], hair_bottom], fill=person.hair)
    return layer


def _draw_occluder(image: Image.Image, rng: np.random.Generator) -> None:
    """A railing, a bench or a car across the bottom, or a pole or another pedestrian at one side."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in rng.integers(20, 235, size=3))
    if rng.random() < 0.5:
        draw.rectangle([0, height * (1 - rng.uniform(0.15, 0.35)), width, height], fill=colour)
    else:
        cover = width * rng.uniform(0.15, 0.35)
        x0 = 0 if rng.random() < 0.5 else width - cover
        draw.rectangle([x0, height * rng.uniform(0.0, 0.3), x0 + cover, height], fill=colour)


def apply_camera(image: Image.Image, camera: Camera, rng: np.random.Generator) -> Image.Image:
    """Sensor and optics: contrast, gamma, illumination and colour cast, noise, resolution, blur; output at crop size."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - 0.5) * camera.contrast + 0.5
    pixels = np.clip(pixels, 0.0, 1.0) ** camera.gamma
    # Light falls off unevenly across a scene: a per-shot vertical gradient on top of the camera's level.
    gradient = np.linspace(1.0, rng.uniform(0.8, 1.2), pixels.shape[0], dtype=np.float32)[:, None, None]
    pixels = pixels * 255.0 * camera.brightness * rng.uniform(0.92, 1.08) * gradient * np.array(camera.cast, dtype=np.float32)
    pixels += rng.normal(0.0, camera.noise, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    low = (max(8, round(CROP_WIDTH * camera.resolution)), max(16, round(CROP_HEIGHT * camera.resolution)))
    image = image.resize(low, Image.BOX).resize((CROP_WIDTH, CROP_HEIGHT), Image.BILINEAR)
    return image.filter(ImageFilter.GaussianBlur(camera.blur)) if camera.blur > 0.3 else image


def render_person(identity: int, camera: int = 0, shot: int = 0, seed: int = 0) -> Image.Image:
    """A 64x128 RGB crop of `identity` as seen by `camera`; `shot` is one frame of the camera's tracklet."""
    person, view_of = make_identity(identity, seed), make_camera(camera, seed)
    rng = np.random.default_rng([seed, identity, camera, shot, 3])
    view, facing_left = tracklet_view(identity, camera, shot, seed)
    image = draw_background(view_of, rng)
    height = CROP_HEIGHT * _SUPERSAMPLE * view_of.person_scale * person.height_scale * rng.uniform(0.95, 1.03)
    layer = _draw_person(person, view, height, rng)
    if facing_left:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    image.paste(layer, (0, 0), layer)
    if rng.random() < view_of.occlusion:
        _draw_occluder(image, rng)
    return apply_camera(image, view_of, rng)


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def person_jpegs(count: int, cameras: int = 2, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEG crops: identities cycle, each seen by every camera in turn."""
    return [encode_jpeg(render_person(i // cameras, camera=i % cameras, seed=seed)) for i in range(count)]


def compose_frame(people: list[Image.Image], width: int, height: int, camera: int = 0,
                  seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A `width` x `height` camera frame with the `people` crops pasted into it, apart, at places drawn
    from the seed; returns the frame and their boxes (x1, y1, x2, y2, frame pixels) FP32 [K,4]."""
    rng = np.random.default_rng([seed, camera, 6])
    scene = make_camera(camera, seed)
    frame = Image.new("RGB", (width, height), scene.wall)
    draw = ImageDraw.Draw(frame)
    draw.rectangle([0, int(height * scene.horizon), width, height], fill=scene.floor)
    columns, rows = width // (CROP_WIDTH + 8), height // (CROP_HEIGHT + 8)
    if len(people) > columns * rows:
        raise ValueError(f"{len(people)} people do not fit apart in a {width}x{height} frame (at most {columns * rows})")
    boxes = []
    for person, slot in zip(people, rng.permutation(columns * rows)):
        x = int(slot % columns * (width // columns) + rng.integers(0, width // columns - person.width + 1))
        y = int(slot // columns * (height // rows) + rng.integers(0, height // rows - person.height + 1))
        frame.paste(person, (x, y))
        boxes.append((x, y, x + person.width, y + person.height))
    return frame, np.array(boxes, dtype=np.float32).reshape(-1, 4)
