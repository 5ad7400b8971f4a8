"""Synthetic person crops in the Market-1501 folder layout, for demos and tests.

Each identity is a person-like figure with its own clothing: shirt and trouser colours from a small
shared palette (so colour alone does not identify anyone), a shirt pattern, hair, shoes and maybe a
bag. Each camera changes what a real camera changes: background, lighting and colour cast, scale,
viewpoint (left/right offset, mirrored side, back view hiding the front print) and occlusion. A
random network therefore ranks poorly; a trained one learns the clothing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from reid_platform.errors import ConfigError

IMAGE_WIDTH, IMAGE_HEIGHT = 64, 128

# A deliberately small palette: many identities share each colour.
PALETTE = [
    (200, 30, 30), (30, 60, 170), (240, 240, 240), (25, 25, 25), (40, 140, 60),
    (230, 200, 40), (120, 120, 125), (140, 80, 40), (230, 120, 170), (90, 40, 130),
]
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "split", "print")


@dataclass(frozen=True)
class Identity:
    shirt: tuple[int, int, int]
    shirt_second: tuple[int, int, int]
    pattern: str
    trousers: tuple[int, int, int]
    shorts: bool
    hair: tuple[int, int, int]
    shoes: tuple[int, int, int]
    bag: tuple[int, int, int] | None
    bag_side: int  # -1 left, +1 right, as seen from the front
    build: float  # shoulder width factor


@dataclass(frozen=True)
class Camera:
    background: tuple[int, int, int]
    texture: float
    gain: float
    cast: tuple[float, float, float]
    scale: float
    offset: float
    back_view: bool
    occlusion: float  # probability of an occluder in front of the person
    blur: float


def random_identity(rng: random.Random) -> Identity:
    shirt, second = rng.sample(PALETTE, 2)
    return Identity(
        shirt=shirt,
        shirt_second=second,
        pattern=rng.choice(PATTERNS),
        trousers=rng.choice(PALETTE),
        shorts=rng.random() < 0.25,
        hair=rng.choice([(20, 15, 10), (90, 60, 30), (200, 170, 90), (130, 130, 130)]),
        shoes=rng.choice([(20, 20, 20), (240, 240, 240), (120, 60, 30)]),
        bag=rng.choice(PALETTE) if rng.random() < 0.4 else None,
        bag_side=rng.choice((-1, 1)),
        build=rng.uniform(0.8, 1.2),
    )


def random_camera(rng: random.Random, strength: float = 1.0) -> Camera:
    """A camera's view; ``strength`` scales how far lighting, colour cast, position, occlusion and blur
    stray from a neutral camera (1 is the default set; the same draws either way)."""

    def spread(value: float, neutral: float) -> float:
        return value if strength == 1.0 else neutral + strength * (value - neutral)

    return Camera(
        background=tuple(rng.randint(40, 220) for _ in range(3)),
        texture=rng.uniform(5, 40),
        gain=max(0.2, spread(rng.uniform(0.6, 1.3), 1.0)),
        cast=tuple(max(0.3, spread(rng.uniform(0.8, 1.2), 1.0)) for _ in range(3)),
        scale=rng.uniform(0.7, 0.95),
        offset=spread(rng.uniform(-0.12, 0.12), 0.0),
        back_view=rng.random() < 0.35,
        occlusion=min(0.9, spread(rng.uniform(0.0, 0.4), 0.0)),
        blur=spread(rng.uniform(0.0, 1.0), 0.0),
    )


def render(person: Identity, camera: Camera, rng: random.Random) -> Image.Image:
    """One crop of ``person`` seen by ``camera``, with per-image pose and position jitter."""
    nprng = np.random.default_rng(rng.getrandbits(32))
    base = np.array(camera.background, dtype=np.float32)
    noise = nprng.normal(0, camera.texture, (IMAGE_HEIGHT, IMAGE_WIDTH, 1)).astype(np.float32)
    gradient = np.linspace(-25, 25, IMAGE_HEIGHT, dtype=np.float32)[:, None, None]
    image = Image.fromarray(np.clip(base + noise + gradient, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    height = IMAGE_HEIGHT * camera.scale * rng.uniform(0.93, 1.05)
    center = IMAGE_WIDTH * (0.5 + camera.offset + rng.uniform(-0.06, 0.06))
    top = (IMAGE_HEIGHT - height) * rng.uniform(0.2, 0.8)
    unit = height / 8.0  # a figure eight heads tall
    half_shoulder = unit * 1.1 * person.build
    mirror = -1 if camera.back_view else 1

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [center + x0, top + y0, center + x1, top + y1]

    # legs, with a stride that varies per image
    stride = rng.uniform(0.0, 0.5) * unit
    leg_top, leg_bottom = 4.0 * unit, 7.7 * unit
    knee = leg_top + (leg_bottom - leg_top) * 0.45
    skin = (225, 180, 150)
    for side in (-1, 1):
        x = side * unit * 0.45 + side * stride / 2
        draw.rectangle(box(x - unit * 0.32, leg_top, x + unit * 0.32, leg_bottom), fill=skin)
        lower = knee if person.shorts else leg_bottom
        draw.rectangle(box(x - unit * 0.36, leg_top, x + unit * 0.36, lower), fill=person.trousers)
        draw.rectangle(box(x - unit * 0.4, leg_bottom, x + unit * 0.45, 8.0 * unit), fill=person.shoes)

    # torso and arms
    torso = box(-half_shoulder, 1.4 * unit, half_shoulder, 4.2 * unit)
    draw.rectangle(torso, fill=person.shirt)
    _draw_pattern(draw, torso, person, show_print=not camera.back_view)
    for side in (-1, 1):
        x = side * (half_shoulder + unit * 0.25)
        draw.rectangle(box(x - unit * 0.25, 1.5 * unit, x + unit * 0.25, 3.9 * unit), fill=person.shirt)
        draw.rectangle(box(x - unit * 0.2, 3.9 * unit, x + unit * 0.2, 4.4 * unit), fill=skin)

    # head and hair (more hair from behind)
    draw.ellipse(box(-unit * 0.5, 0.2 * unit, unit * 0.5, 1.3 * unit), fill=skin)
    hair_bottom = 1.2 * unit if camera.back_view else 0.55 * unit
    draw.rectangle(box(-unit * 0.5, 0.15 * unit, unit * 0.5, hair_bottom), fill=person.hair)

    if person.bag is not None:
        x = person.bag_side * mirror * (half_shoulder + unit * 0.4)
        draw.rectangle(box(x - unit * 0.4, 2.8 * unit, x + unit * 0.4, 4.0 * unit), fill=person.bag)

    if rng.random() < camera.occlusion:
        occluder = tuple(rng.randint(0, 255) for _ in range(3))
        y0 = IMAGE_HEIGHT * rng.uniform(0.45, 0.75)
        x0 = IMAGE_WIDTH * rng.uniform(-0.3, 0.5)
        draw.rectangle([x0, y0, x0 + IMAGE_WIDTH * rng.uniform(0.4, 0.9), IMAGE_HEIGHT], fill=occluder)

    if camera.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    pixels = np.asarray(image, dtype=np.float32) * camera.gain * np.array(camera.cast, np.float32)
    pixels += nprng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_pattern(draw: ImageDraw.ImageDraw, torso: list[float], person: Identity, show_print: bool) -> None:
    x0, y0, x1, y1 = torso
    color = person.shirt_second
    if person.pattern == "hstripes":
        step = (y1 - y0) / 6
        for i in range(0, 6, 2):
            draw.rectangle([x0, y0 + i * step, x1, y0 + (i + 1) * step], fill=color)
    elif person.pattern == "vstripes":
        step = (x1 - x0) / 5
        for i in range(0, 5, 2):
            draw.rectangle([x0 + i * step, y0, x0 + (i + 1) * step, y1], fill=color)
    elif person.pattern == "checks":
        sx, sy = (x1 - x0) / 4, (y1 - y0) / 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2:
                    draw.rectangle([x0 + i * sx, y0 + j * sy, x0 + (i + 1) * sx, y0 + (j + 1) * sy], fill=color)
    elif person.pattern == "split":
        draw.rectangle([x0, (y0 + y1) / 2, x1, y1], fill=color)
    elif person.pattern == "print" and show_print:
        cx, cy, r = (x0 + x1) / 2, y0 + (y1 - y0) * 0.4, (x1 - x0) * 0.25
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _market_name(person_id: int, camera: int, frame: int, box_index: int) -> str:
    pid = "-1" if person_id < 0 else f"{person_id:04d}"
    return f"{pid}_c{camera}s1_{frame:06d}_{box_index:02d}.jpg"


def write_synthetic_market1501(
    out: Path,
    identities: int = 200,
    cameras: int = 6,
    seed: int = 0,
    train_images_per_identity: int = 12,
    gallery_images_per_camera: int = 2,
    distractors: int = 20,
    junk: int = 10,
    progress: bool = True,
    camera_strength: float = 1.0,
) -> dict[str, int]:
    """Write a Market-1501 style tree under ``out``; return the image count of each folder.

    Half the identities (rounded down) train, the rest test, with disjoint ids. Each test identity
    appears in at least two cameras and has one query per camera it appears in, so every query has a
    true match from another camera. The gallery also holds distractors (id 0) and junk (id -1).
    ``camera_strength`` above 1 makes the cameras differ more (a harder set).
    """
    # each a `reid data synth` flag of the same name: refused (exit status 2) before anything is written
    if identities < 4:
        raise ConfigError(f"identities (--identities) must be at least 4 (got {identities})")
    if not 2 <= cameras <= 9:
        raise ConfigError(f"cameras (--cameras) must be between 2 and 9, as in Market-1501 names (got {cameras})")
    if not 0 < camera_strength < math.inf:
        raise ConfigError(f"camera_strength (--camera-strength) must be a positive number (got {camera_strength})")
    rng = random.Random(seed)
    camera_views = [random_camera(rng, camera_strength) for _ in range(cameras)]
    num_train = identities // 2
    folders = {"bounding_box_train": [], "bounding_box_test": [], "query": []}
    frame = 0

    def add(folder: str, person_id: int, person: Identity | None, camera: int) -> None:
        nonlocal frame
        frame += 1
        folders[folder].append((_market_name(person_id, camera + 1, frame, 1), person, camera, rng.getrandbits(32)))

    for index in range(identities):
        person_id = index + 1
        person = random_identity(rng)
        seen_by = sorted(rng.sample(range(cameras), rng.randint(2, cameras)))
        if index < num_train:
            for _ in range(train_images_per_identity):
                add("bounding_box_train", person_id, person, rng.choice(seen_by))
        else:
            for camera in seen_by:
                add("query", person_id, person, camera)
                for _ in range(gallery_images_per_camera):
                    add("bounding_box_test", person_id, person, camera)
    for _ in range(distractors):
        add("bounding_box_test", 0, random_identity(rng), rng.randrange(cameras))
    for _ in range(junk):
        add("bounding_box_test", -1, None, rng.randrange(cameras))

    jobs = [(folder, item) for folder, items in folders.items() for item in items]
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    for folder, (name, person, camera, image_seed) in tqdm(
        jobs, desc="synthesising", unit="img", disable=not progress
    ):
        image_rng = random.Random(image_seed)
        view = camera_views[camera]
        if person is None:  # junk: a background-only crop, as Market-1501's -1 boxes often are
            person = random_identity(image_rng)
            view = Camera(**{**view.__dict__, "occlusion": 1.0, "scale": 0.3})
        render(person, view, image_rng).save(out / folder / name, quality=92)
    return {folder: len(items) for folder, items in folders.items()}
