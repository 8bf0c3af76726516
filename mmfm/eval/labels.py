"""What each demo-corpus sample asks for, read from its caption and metadata (never from pixels).

The demo generators (mmfm/data/demo_corpus) write captions in a fixed grammar, so the labels a scorer is
fitted and checked against are parsed here once:

    digit      "a handwritten digit 7"                                   -> {"digit": "7"}
    scene      "a large red circle at the top left on a white background" -> colour, shape, size,
               position ("top left", "middle right", "center", ...) and background; only scenes
               with ONE object are labelled, so "the named object" is unambiguous
    clip       "a red square moves left to right on a blue background"   -> colour, motion, background
    tone       "a single piano-like note C4 ..." / "a C major chord (...)" -> {"tone": "C4" | "C major"}
    shape      json.primitives == ["torus"] (one primitive only)          -> {"primitive": "torus"}

A caption outside the grammar gives None (the sample is not used for that task), not a guess.
"""
from __future__ import annotations

import re

from mmfm.data.demo_corpus.audio import CHORDS, NOTES
from mmfm.data.demo_corpus.images import COLORS, SHAPES
from mmfm.data.demo_corpus.shapes3d import PRIMITIVES
from mmfm.data.demo_corpus.video import MOTIONS

_COLOR = "|".join(COLORS)
_SCENE = re.compile(rf"^an? (small|large) ({_COLOR}) ({'|'.join(SHAPES)}) at the ([a-z]+(?: [a-z]+)?) "
                    rf"on an? ({_COLOR}) background$")
_CLIP = re.compile(rf"^an? ({_COLOR}) ({'|'.join(SHAPES)}) ({'|'.join(MOTIONS)})(?: to ({_COLOR}))? "
                   rf"on an? ({_COLOR}) background$")
_DIGIT = re.compile(r"^a handwritten digit (\d)$")
_NOTE = re.compile(rf"^a single piano-like note ({'|'.join(NOTES)}) lasting")
_CHORD = re.compile(rf"^an? ({'|'.join(CHORDS)}) chord \(")

# the position phrases the scene renderer can write (mmfm.data.demo_corpus.images._where)
POSITIONS = ("top left", "top center", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom center", "bottom right")
TONES = tuple(NOTES) + tuple(CHORDS)


def _caption(sample: dict) -> str:
    txt = sample.get("txt")
    return txt.strip() if isinstance(txt, str) else ""


def digit_label(sample: dict) -> dict | None:
    m = _DIGIT.match(_caption(sample))
    return {"digit": m.group(1)} if m else None


def scene_label(sample: dict) -> dict | None:
    m = _SCENE.match(_caption(sample))
    if not m or m.group(4) not in POSITIONS:
        return None
    size, colour, shape, position, background = m.groups()
    return {"size": size, "colour": colour, "shape": shape, "position": position, "background": background}


def clip_label(sample: dict) -> dict | None:
    m = _CLIP.match(_caption(sample))
    if not m:
        return None
    colour, shape, motion, _to, background = m.groups()
    return {"colour": colour, "shape": shape, "motion": motion, "background": background}


def tone_label(sample: dict) -> dict | None:
    cap = _caption(sample)
    m = _NOTE.match(cap) or _CHORD.match(cap)
    return {"tone": m.group(1)} if m else None


def shape_label(sample: dict) -> dict | None:
    prims = (sample.get("json") or {}).get("primitives")
    if isinstance(prims, list) and len(prims) == 1 and prims[0] in PRIMITIVES:
        return {"primitive": prims[0]}
    return None
