"""Images: photographs bundled in scikit-image's wheel, scikit-learn's handwritten digits, and
rendered scenes of shapes whose captions say what is drawn where.

The scikit-image files are read straight from the installed package folder (no download, no
import of skimage); only images the wheel ships are listed.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
from PIL import Image, ImageDraw

SKIMAGE_IMAGES = {  # file: (caption, license as skimage.data documents it)
    "astronaut.png": ("a color portrait of astronaut Eileen Collins in front of a flag", "public domain (NASA)"),
    "camera.png": ("a black and white photograph of a person standing behind a camera on a tripod",
                   "CC0 (Lav Varshney)"),
    "coffee.png": ("a cup of coffee on a saucer seen from above", "CC0 (Rachel Michetti)"),
    "chelsea.png": ("a photograph of a tabby cat looking to the side", "CC0 (Stefan van der Walt)"),
    "coins.png": ("old greek coins on a dark background", "no known copyright restrictions"),
    "rocket.jpg": ("a rocket standing on a launch pad", "public domain (SpaceX)"),
    "horse.png": ("the black silhouette of a horse on white", "CC0 (Andreas Preuss)"),
    "grass.png": ("a close-up texture of green grass", "CC0 (CC0Textures)"),
    "brick.png": ("a grey brick wall texture", "CC0 (CC0Textures)"),
    "moon.png": ("a grey image of the surface of the moon", "no known copyright restrictions"),
}

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def _skimage_dir() -> str | None:
    spec = importlib.util.find_spec("skimage")
    return os.path.join(os.path.dirname(spec.origin), "data") if spec and spec.origin else None


def _resize(img: Image.Image, side: int) -> np.ndarray:
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((side, side), Image.BICUBIC))


def bundled_photos(side: int):
    folder = _skimage_dir()
    if folder is None:
        return
    for i, (name, (caption, license)) in enumerate(SKIMAGE_IMAGES.items()):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        arr = _resize(Image.open(path), side)
        yield {"__key__": f"photo_{i:03d}", "png": arr, "txt": caption,
               "json": {"modality": "image", "source": f"scikit-image wheel: skimage/data/{name}", "license": license,
                        "width": side, "height": side, "channels": 3}}


def digits(count: int, side: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(min(count, len(d.images))):
        arr = (255 - d.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white
        arr = np.asarray(Image.fromarray(arr).resize((side, side), Image.NEAREST))
        yield {"__key__": f"digit_{i:04d}", "png": arr, "txt": f"a handwritten digit {d.target[i]}",
               "json": {"modality": "image", "source": f"scikit-learn load_digits() index {i} (UCI ML hand-written digits)",
                        "license": "CC BY 4.0", "width": side, "height": side, "channels": 1}}


def with_article(phrase: str) -> str:
    """The phrase with its indefinite article: 'an orange circle', 'a large circle'."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _where(cx: float, cy: float) -> str:
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}" if v != "middle" else f"middle {h}"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color, angle: float = 0.0):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        k = 4 if shape == "square" else 3
        base = np.pi / 4 if shape == "square" else -np.pi / 2
        pts = [(cx + r * np.cos(base + angle + 2 * np.pi * j / k), cy + r * np.sin(base + angle + 2 * np.pi * j / k))
               for j in range(k)]
        draw.polygon(pts, fill=color)


def shape_scenes(count: int, side: int, rng: np.random.Generator, objects: tuple[float, ...] | None = None):
    """Scenes of 1-3 shapes. objects: relative weights of 1, 2, 3, ... objects per scene (None: uniform
    over 1-3, drawn as the corpus always drew them, so existing corpora stay bit-identical)."""
    names = list(COLORS)
    p = None
    if objects is not None:
        w = np.asarray(objects, np.float64)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"scene objects: expected non-negative weights of 1, 2, ... objects, got {objects!r}")
        p = w / w.sum()
    for i in range(count):
        bg = names[int(rng.integers(len(names)))]
        img = Image.new("RGB", (side, side), COLORS[bg])
        draw = ImageDraw.Draw(img)
        parts = []
        n_objects = int(rng.integers(1, 4)) if p is None else 1 + int(rng.choice(len(p), p=p))
        for _ in range(n_objects):
            shape = SHAPES[int(rng.integers(3))]
            color = names[int(rng.integers(len(names)))]
            while color == bg:
                color = names[int(rng.integers(len(names)))]
            size = "small" if rng.random() < 0.5 else "large"
            r = side * (0.1 if size == "small" else 0.2)
            cx, cy = rng.uniform(r, side - r, size=2)
            draw_shape(draw, shape, cx, cy, r, COLORS[color])
            parts.append(f"{with_article(f'{size} {color} {shape}')} at the {_where(cx / side, cy / side)}")
        caption = f"{', '.join(parts[:-1]) + ' and ' if len(parts) > 1 else ''}{parts[-1]} on {with_article(bg)} background"
        yield {"__key__": f"scene_{i:05d}", "png": np.asarray(img), "txt": caption,
               "json": {"modality": "image", "source": "mmfm.data.demo_corpus.images.shape_scenes (rendered)",
                        "license": "Apache-2.0 (generated by mmfm)", "width": side, "height": side, "channels": 3}}
