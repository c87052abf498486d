"""Procedural outdoor scenes: ctxseg's default dataset for demos, notebooks and tests.

Scene grammar
-------------
Every image is painted back to front in three steps.

1. **Regions.** A horizon ``y = h(x)`` (a tilted line plus a sum of random sinusoids) separates
   *sky* from the land below. Below it the scene is all *ground*, all *water* (open sea), or both,
   split by a shoreline that is again a tilted sum of sinusoids (water in the distance, in the
   foreground or to one side) or by the outline of an irregular lake. A few images have the
   horizon above the frame and so no sky at all.
2. **Objects**, each standing where it belongs: *trees* (a leaning trunk under a star-shaped
   crown), *cars* and *persons* on ground, *boats* on water, *birds* in the sky. An object is
   anchored at a random point of its region, and a placement is rejected when the object's
   outline, grown by one pixel, would cover a region it must not touch: a car or person never
   borders water, a boat never borders ground, a bird borders neither. Objects are drawn in depth
   order: an anchor lower in the image is nearer, so it is drawn larger and later, and covers
   what lies behind it. Shapes are star-shaped blobs ``r(t) = r0 (1 + sum_k a_k sin(k t + p_k))``,
   rotated rounded rectangles and thin rotated capsules, so boundaries are rarely axis-aligned.
3. **Appearance.** Each region and object part gets a colour and a texture: one or two oriented
   sinusoidal gratings plus per-pixel noise. The whole image then gets a colour tint, a
   brightness and a linear illumination gradient.

Intended difficulty
-------------------
Local appearance is ambiguous on purpose, so that a model has to use context and shape:

* **car vs boat**: both come from the *same* shape and appearance generator; only what they
  stand on (ground or water) tells them apart.
* **sky vs water**: water takes a usually darker, hue-shifted copy of the sky's colour. Sky has
  a smooth vertical gradient and faint broad clouds, water has fine, roughly horizontal ripples,
  a difference visible over a patch but not in a single pixel; the horizon settles the rest.
* **tree vs ground**: tree crowns often take the ground's hue and trunks are brown like bare
  ground; crowns differ by a finer, cross-hatched texture and by their outline.
* **person**: clothes span the same colours as vehicles; limbs are thin, so boundaries matter.

A model that sees only a few pixels confuses these pairs; one that sees an object together with
its surroundings mostly does not. Birds and persons are small and thin, so they also reward a
model that keeps spatial resolution while it gathers context.
"""

from __future__ import annotations

import bisect
import colorsys
import functools
import math

import numpy as np

from ctxseg.data.base import DatasetInfo, SegmentationDataset

CLASS_NAMES = ("sky", "water", "ground", "tree", "car", "boat", "bird", "person")
SKY, WATER, GROUND, TREE, CAR, BOAT, BIRD, PERSON = range(len(CLASS_NAMES))
PALETTE = (
    (135, 200, 240),  # sky
    (20, 70, 170),  # water
    (150, 115, 60),  # ground
    (30, 140, 40),  # tree
    (220, 30, 40),  # car
    (250, 170, 20),  # boat
    (130, 50, 170),  # bird
    (250, 120, 200),  # person
)
SYNTHETIC_INFO = DatasetInfo("synthetic", CLASS_NAMES, PALETTE)

SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS = {"train": 2000, "val": 200, "test": 200}
MIN_SIDE = 32

# Columns of the appearance table, one row per region or object part ("instance"): RGB colour,
# brightness change per row, two gratings as (wave vector x, wave vector y, phase, amplitude) and
# the noise amplitude. The renderer gathers them through the instance map.
_COLUMNS = ("r", "g", "b", "gv", "k1x", "k1y", "p1", "a1", "k2x", "k2y", "p2", "a2", "sigma")
_TAU = 2.0 * math.pi
# Cumulative probabilities of the region layouts: land only, open sea, water far, water near,
# water to one side, lake.
_MODE_CDF = (0.24, 0.36, 0.54, 0.70, 0.88)


def _uniform_stream(rng: np.random.Generator):
    while True:
        yield from rng.random(256).tolist()


@functools.lru_cache(maxsize=16)
def _axes(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row coordinates (h, 1) and column coordinates (1, w) as float32, shared per size."""
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return 255.0 * r, 255.0 * g, 255.0 * b


class _Scene:
    """Draws one image from one RNG; the random draws are the only source of variation."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng = rng
        # Scalar Generator.uniform costs ~1.4 us a call and a scene makes hundreds of draws, so
        # scalars come from a pre-drawn block instead (still a pure function of the RNG state).
        self._next = _uniform_stream(rng).__next__
        self.h, self.w = h, w
        self.ys, self.xs = _axes(h, w)
        # Object and texture sizes are specified for 128x128 and scaled with the image.
        self.s0 = math.sqrt(h * w) / 128.0
        self.rows: list[list[float]] = []
        self.classes: list[int] = []

    def u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        """One uniform draw from [lo, hi)."""
        return lo + (hi - lo) * self._next()

    # ---------------------------------------------------------------- appearance rows

    def _grating(self, period: float, angle: float, amp: float) -> list[float]:
        # Periods shorter than ~2.5 px alias into moire, which would be a texture cue of its own.
        k = _TAU / max(period * self.s0, 2.5)
        return [k * math.cos(angle), k * math.sin(angle), self.u(0.0, _TAU), amp]

    def _instance(self, cls: int, rgb, gv: float, g1: list[float], g2: list[float] | None,
                  sigma: float) -> int:
        """Add an appearance row (see ``_COLUMNS``) for a part of class ``cls``; return its id."""
        self.rows.append([*rgb, gv, *g1, *(g2 or [0.0, 0.0, 0.0, 0.0]), sigma])
        self.classes.append(cls)
        return len(self.rows) - 1

    def _vehicle_parts(self, cls: int) -> tuple[int, int]:
        """Body and cabin instances of a car or a boat: one generator for both, on purpose."""
        u = self.u
        if u() < 0.3:  # white, grey or black
            body = _hsv(u(), u(0.0, 0.12), u(0.15, 0.95))
        else:
            body = _hsv(u(), u(0.45, 0.9), u(0.35, 0.95))
        g1 = self._grating(u(8.0, 20.0), u(0.0, math.pi), u(3.0, 8.0))
        b = self._instance(cls, body, 0.0, g1, None, u(3.0, 6.0))
        if u() < 0.5:  # dark windows
            cabin = _hsv(u(0.5, 0.65), u(0.1, 0.4), u(0.12, 0.35))
        else:
            cabin = tuple(0.8 * c for c in body)
        g1 = self._grating(u(8.0, 20.0), u(0.0, math.pi), u(2.0, 6.0))
        c = self._instance(cls, cabin, 0.0, g1, None, u(3.0, 6.0))
        return b, c

    # ---------------------------------------------------------------- regions

    def _wave(self, t: np.ndarray, length: float, terms) -> np.ndarray:
        """Sum of sinusoids along ``t``; a term is (max amplitude, (min, max) cycles per length)."""
        u = self.u
        out = np.zeros_like(t)
        for amp, (lo, hi) in terms:
            out += u(0.0, amp) * np.sin((_TAU * u(lo, hi) / length) * t + u(0.0, _TAU))
        return out

    def regions(self) -> np.ndarray:
        """Draw the sky / water / ground label map (uint8) and add the three regions' rows."""
        h, w, u = self.h, self.w, self.u
        ys, xs = self.ys, self.xs
        if u() < 0.06:
            self.horizon = np.full((1, w), -1.0, np.float32)
        else:
            x = xs - w / 2
            self.horizon = (
                u(0.15, 0.6) * h
                + u(-0.2, 0.2) * x
                + self._wave(xs, w, ((0.08 * h, (0.3, 1.5)), (0.035 * h, (1.5, 4.0)),
                                     (0.012 * h, (4.0, 10.0))))
            )
        sky = ys < self.horizon
        top = max(float(self.horizon.mean()), 0.0)

        layout = np.full((h, w), GROUND, np.uint8)
        mode = bisect.bisect(_MODE_CDF, u())
        shore_terms = ((0.06 * h, (0.3, 1.5)), (0.025 * h, (1.5, 4.0)), (0.01 * h, (4.0, 12.0)))
        if mode == 1:  # open sea
            layout[:] = WATER
        elif mode in (2, 3):  # shoreline across the image: water far (2) or near (3)
            y0 = u(top + 0.12 * (h - top), top + 0.75 * (h - top))
            shore = y0 + u(-0.3, 0.3) * (xs - w / 2) + self._wave(xs, w, shore_terms)
            layout[(ys < shore) if mode == 2 else (ys >= shore)] = WATER
        elif mode == 4:  # shoreline running down the image, water on one side
            shore = (u(0.2, 0.8) * w + u(-0.9, 0.9) * (ys - h / 2)
                     + self._wave(ys, h, tuple((a * w / h, f) for a, f in shore_terms)))
            layout[(xs < shore) if u() < 0.5 else (xs >= shore)] = WATER
        elif mode == 5:  # lake: a flattened star-shaped blob
            r0 = u(0.15, 0.3) * min(h, w)
            lake = ("blob", u(0.2, 0.8) * w, u(top + 0.3 * (h - top), h), r0, u(1.4, 2.4),
                    u(0.5, 0.8), u(-0.2, 0.2), self._harmonics((2, 3, 4, 5), 0.15))
            (y0, y1, x0, x1), masks = self._rasterize([lake], margin=0)
            layout[y0:y1, x0:x1][masks[0]] = WATER
        layout[sky] = SKY

        # Background instances 0, 1, 2 are the sky, water and ground regions themselves.
        cloudy = u() < 0.25
        sky_hsv = (u(0.52, 0.64), u(0.0, 0.12) if cloudy else u(0.2, 0.6), u(0.6, 0.95))
        self._instance(
            SKY, _hsv(*sky_hsv), u(12.0, 35.0) / h,  # brighter towards the horizon
            self._grating(u(25.0, 60.0), math.pi / 2 + u(-0.4, 0.4), u(2.0, 7.0)), None,
            u(2.0, 5.0),
        )
        water_hsv = (sky_hsv[0] + u(-0.04, 0.08), sky_hsv[1] * u(0.8, 1.4),
                     sky_hsv[2] * u(0.7, 1.05))
        self._instance(
            WATER, _hsv(*water_hsv), u(-10.0, 10.0) / h,
            self._grating(u(3.0, 8.0), math.pi / 2 + u(-0.3, 0.3), u(5.0, 14.0)),
            self._grating(u(10.0, 25.0), math.pi / 2 + u(-0.6, 0.6), u(0.0, 6.0)),
            u(4.0, 8.0),
        )
        green = u() < 0.6
        self.ground_hue = u(0.17, 0.32) if green else u(0.06, 0.12)
        self._instance(
            GROUND, _hsv(self.ground_hue, u(0.3, 0.65), u(0.35, 0.7)), 0.0,
            self._grating(u(6.0, 20.0), u(0.0, math.pi), u(4.0, 12.0)),
            self._grating(u(6.0, 20.0), u(0.0, math.pi), u(0.0, 8.0)),
            u(6.0, 12.0),
        )
        self.layout = layout
        return layout

    # ---------------------------------------------------------------- shapes

    def _harmonics(self, ks, amp: float) -> tuple:
        u = self.u
        return tuple((k, u(0.0, amp), u(0.0, _TAU)) for k in ks)

    def _rasterize(self, prims, margin: int):
        """Evaluate primitives on the union of their bounding boxes (plus ``margin`` pixels).

        Returns ((y0, y1, x0, x1), [bool mask per primitive]) or (None, None) when the union lies
        outside the image.
        """
        boxes = [_bounds(p) for p in prims]
        y0 = max(int(math.floor(min(b[0] for b in boxes))) - margin, 0)
        y1 = min(int(math.ceil(max(b[1] for b in boxes))) + 1 + margin, self.h)
        x0 = max(int(math.floor(min(b[2] for b in boxes))) - margin, 0)
        x1 = min(int(math.ceil(max(b[3] for b in boxes))) + 1 + margin, self.w)
        if y0 >= y1 or x0 >= x1:
            return None, None
        ys, xs = self.ys[y0:y1], self.xs[:, x0:x1]
        masks = [None] * len(prims)
        # Capsules and boxes of one object are evaluated together, stacked on a leading axis:
        # numpy's per-call overhead, not arithmetic, dominates on windows this small.
        for kind, inside in (("capsule", _capsules), ("box", _boxes)):
            idx = [j for j, p in enumerate(prims) if p[0] == kind]
            if idx:
                stacked = inside(np.array([prims[j][1:] for j in idx], np.float32), ys, xs)
                for j, m in zip(idx, stacked):
                    masks[j] = m
        for j, p in enumerate(prims):
            if p[0] == "blob":
                masks[j] = _blob(p, ys, xs)
        return (y0, y1, x0, x1), masks

    def _anchor(self, region: int, y_lo: float, y_hi: float):
        """A random pixel of ``region`` with y in [y_lo, y_hi), or None after a few misses."""
        y_lo, y_hi = max(int(y_lo), 0), min(int(math.ceil(y_hi)), self.h)
        if y_lo >= y_hi:
            return None
        for _ in range(30):
            y = min(int(self.u(y_lo, y_hi)), y_hi - 1)
            x = min(int(self.u(0, self.w)), self.w - 1)
            if self.layout[y, x] == region:
                return x, y
        return None

    # ---------------------------------------------------------------- objects

    def _tree(self, ax, ay, p):
        u = self.u
        lean = u(-0.25, 0.25)
        length = u(6.0, 16.0) * p
        tx, ty = ax + length * math.sin(lean), ay - length * math.cos(lean)
        r0 = u(6.0, 13.0) * p
        sy = u(1.0, 1.4)
        trunk = ("capsule", ax, ay, tx, ty, max(u(1.0, 2.2) * p, 0.7))
        crown = ("blob", tx, ty - 0.6 * r0 * sy, r0, u(0.8, 1.1), sy, u(-0.3, 0.3),
                 self._harmonics((2, 3, 5, 7), 0.13))
        hue = self.ground_hue + u(-0.04, 0.04) if u() < 0.5 else u(0.17, 0.36)
        leaves = self._instance(
            TREE, _hsv(hue, u(0.35, 0.75), u(0.25, 0.6)), 0.0,
            self._grating(u(3.0, 6.0), u(0.0, math.pi), u(8.0, 16.0)),
            self._grating(u(3.0, 6.0), u(0.0, math.pi), u(8.0, 16.0)),
            u(8.0, 14.0),
        )
        bark = self._instance(
            TREE, _hsv(u(0.05, 0.1), u(0.4, 0.7), u(0.2, 0.45)), 0.0,
            self._grating(u(2.5, 4.0), lean + u(-0.2, 0.2), u(4.0, 8.0)), None, u(4.0, 8.0),
        )
        return [(trunk, bark), (crown, leaves)]

    def _vehicle(self, ax, ay, p, cls):
        u = self.u
        hw = u(6.0, 12.0) * p
        hh = u(0.28, 0.42) * hw
        ang = u(-0.25, 0.25)
        c, s = math.cos(ang), math.sin(ang)

        def at(lx, ly):  # object frame (anchor at the bottom centre) -> image
            return ax + c * lx - s * ly, ay + s * lx + c * ly

        chw, chh = u(0.35, 0.65) * hw, u(0.6, 1.0) * hh
        body = ("box", *at(0.0, -hh), hw, hh, u(0.3, 0.9) * hh, ang)
        cabin = ("box", *at(u(-0.3, 0.3) * hw, -2.0 * hh - 0.8 * chh), chw, chh,
                 u(0.3, 0.9) * chh, ang)
        b, k = self._vehicle_parts(cls)
        return [(body, b), (cabin, k)]

    def _person(self, ax, ay, p):
        u = self.u
        height = u(18.0, 30.0) * p
        stride = u(0.05, 0.2) * height
        lean = u(-0.15, 0.15)
        hip = (ax + 0.45 * height * math.sin(lean), ay - 0.45 * height)
        neck = (hip[0] + 0.32 * height * math.sin(lean), hip[1] - 0.32 * height)
        head_r = max(0.1 * height, 1.0)
        limb = max(0.07 * height, 1.0)
        hands = [(neck[0] + sgn * u(0.1, 0.25) * height, neck[1] + u(0.2, 0.35) * height)
                 for sgn in (-1.0, 1.0)]
        trousers = self._instance(PERSON, _hsv(u(), u(0.1, 0.7), u(0.15, 0.7)), 0.0,
                                  self._grating(u(4.0, 10.0), u(0.0, math.pi), u(2.0, 6.0)),
                                  None, u(3.0, 6.0))
        shirt = self._instance(PERSON, _hsv(u(), u(0.2, 0.9), u(0.3, 0.95)), 0.0,
                               self._grating(u(4.0, 10.0), u(0.0, math.pi), u(2.0, 6.0)),
                               None, u(3.0, 6.0))
        skin = self._instance(PERSON, _hsv(u(0.03, 0.1), u(0.25, 0.6), u(0.35, 0.95)), 0.0,
                              self._grating(u(6.0, 12.0), u(0.0, math.pi), u(1.0, 3.0)),
                              None, u(2.0, 4.0))
        parts = [(("capsule", ax + sgn * stride / 2, ay, *hip, limb), trousers)
                 for sgn in (-1.0, 1.0)]
        parts.append((("capsule", *hip, *neck, max(0.1 * height, 1.0)), shirt))
        parts += [(("capsule", *neck, *hand, max(0.7 * limb, 0.6)), shirt) for hand in hands]
        parts.append((("capsule", neck[0], neck[1] - 0.8 * head_r, neck[0], neck[1] - 0.8 * head_r,
                       head_r), skin))
        return parts

    def _bird(self, ax, ay, _p):
        u = self.u
        span = u(5.0, 10.0) * self.s0
        lift = u(-0.3, 0.8) * span
        tilt = u(-0.3, 0.3)
        c, s = math.cos(tilt), math.sin(tilt)
        width = max(0.15 * span, 0.8)
        dark = u() < 0.75
        look = self._instance(BIRD, _hsv(u(), u(0.0, 0.3), u(0.08, 0.35) if dark else u(0.8, 1.0)),
                              0.0, self._grating(u(4.0, 8.0), u(0.0, math.pi), u(1.0, 4.0)),
                              None, u(2.0, 5.0))
        body = ("blob", ax, ay, max(0.3 * span, 1.0), 1.6, 0.8, tilt, ())
        wings = [("capsule", ax, ay, ax + c * sx * span + s * lift, ay + s * sx * span - c * lift,
                  width) for sx in (-1.0, 1.0)]
        return [(body, look)] + [(wing, look) for wing in wings]

    def objects(self, inst: np.ndarray) -> None:
        """Place objects by their context rules and paint them into ``inst`` in depth order."""
        h, rng = self.h, self.rng
        layout = self.layout
        has = np.bincount(layout.ravel(), minlength=3) > 0
        top = float(self.horizon.min())
        # (region of the anchor, regions the object must not border, builder, mean extra count)
        kinds = [
            (GROUND, (), self._tree, 2.0),
            (GROUND, (WATER,), functools.partial(self._vehicle, cls=CAR), 1.2),
            (WATER, (GROUND,), functools.partial(self._vehicle, cls=BOAT), 1.6),
            (GROUND, (WATER,), self._person, 1.2),
            (SKY, (WATER, GROUND), self._bird, 1.5),
        ]
        placed = []
        for region, forbid, build, mean in kinds:
            # A third of the images lack each kind even where its region exists.
            if not has[region] or self.u() < 0.35:
                continue
            y_lo, y_hi = (0.0, float(self.horizon.max())) if region == SKY else (top, h)
            for _ in range(1 + int(rng.poisson(mean))):
                for _attempt in range(4):
                    anchor = self._anchor(region, y_lo, y_hi)
                    if anchor is None:
                        break
                    ax, ay = anchor
                    n_rows = len(self.rows)
                    # Perspective: anchors lower in the frame are nearer, hence larger.
                    parts = build(float(ax), float(ay), self.s0 * (0.45 + 1.1 * ay / h))
                    box, masks = self._rasterize([prim for prim, _ in parts], margin=1)
                    if box is not None and not self._touches(box, masks, forbid):
                        placed.append((ay, box, masks, [row for _, row in parts]))
                        break
                    del self.rows[n_rows:], self.classes[n_rows:]
        placed.sort(key=lambda obj: obj[0])
        for _, (y0, y1, x0, x1), masks, ids in placed:
            window = inst[y0:y1, x0:x1]
            for m, i in zip(masks, ids):
                window[m] = i

    def _touches(self, box, masks, forbid) -> bool:
        """Whether the union of ``masks``, grown by one pixel, covers a forbidden region."""
        if not forbid:
            return False
        y0, y1, x0, x1 = box
        m = np.logical_or.reduce(masks)
        grown = m.copy()
        grown[1:] |= m[:-1]
        grown[:-1] |= m[1:]
        grown[:, 1:] |= m[:, :-1]
        grown[:, :-1] |= m[:, 1:]
        below = self.layout[y0:y1, x0:x1][grown]
        return any(bool((below == f).any()) for f in forbid)

    # ---------------------------------------------------------------- pixels

    def render(self, inst: np.ndarray) -> np.ndarray:
        """Texture every pixel from its instance's appearance row, then light the whole image."""
        u = self.u
        ys, xs = self.ys, self.xs
        # Channel-planar float32 throughout: gathering contiguous columns and broadcasting over
        # (H, W) planes is several times faster than working on (H, W, 3) with a trailing axis.
        table = np.asarray(self.rows, dtype=np.float32).T.copy()
        gv, k1x, k1y, p1, a1, k2x, k2y, p2, a2, sigma = (table[j][inst]
                                                         for j in range(3, len(_COLUMNS)))
        lum = a1 * np.sin(k1x * xs + k1y * ys + p1)
        lum += a2 * np.sin(k2x * xs + k2y * ys + p2)
        lum += gv * ys
        # Unit-variance uniform noise: the same grain as normals at a quarter of the cost.
        noise = self.rng.random(inst.shape, dtype=np.float32)
        noise -= 0.5
        noise *= sigma * math.sqrt(12.0)
        lum += noise
        # Illumination: a brightness times a linear gradient in a random direction.
        angle, strength = u(0.0, _TAU), u(0.0, 0.35)
        gx = strength * math.cos(angle) / self.w
        gy = strength * math.sin(angle) / self.h
        light = u(0.8, 1.15) + gx * (xs - self.w / 2) + gy * (ys - self.h / 2)
        tint = 1.0 + self.rng.uniform(-0.08, 0.08, size=3)
        image = np.empty((*inst.shape, 3), np.uint8)
        for c in range(3):
            plane = table[c][inst]
            plane += lum
            plane *= light * tint[c]
            np.clip(plane, 0.0, 255.0, out=plane)
            image[..., c] = plane
        return image


def _bounds(prim) -> tuple[float, float, float, float]:
    """(y_min, y_max, x_min, x_max) that contain the primitive."""
    kind = prim[0]
    if kind == "capsule":
        _, ax, ay, bx, by, r = prim
        return min(ay, by) - r, max(ay, by) + r, min(ax, bx) - r, max(ax, bx) + r
    if kind == "box":
        _, cx, cy, hw, hh, _r, ang = prim
        c, s = abs(math.cos(ang)), abs(math.sin(ang))
        ex, ey = c * hw + s * hh, s * hw + c * hh
        return cy - ey, cy + ey, cx - ex, cx + ex
    _, cx, cy, r0, sx, sy, _ang, harm = prim
    reach = r0 * (1.0 + sum(a for _, a, _ in harm)) * max(sx, sy)
    return cy - reach, cy + reach, cx - reach, cx + reach


def _capsules(params: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(k, h, w) masks of k capsules, ``params`` rows = (ax, ay, bx, by, radius)."""
    ax, ay, bx, by, r = (params[:, j, None, None] for j in range(5))
    vx, vy = bx - ax, by - ay
    inv = 1.0 / (vx * vx + vy * vy + 1e-6)
    px, py = xs - ax, ys - ay
    # Parameter of the nearest point on the segment, clamped to its ends.
    t = px * (vx * inv) + py * (vy * inv)
    np.clip(t, 0.0, 1.0, out=t)
    ex, ey = px - t * vx, py - t * vy
    return ex * ex + ey * ey <= r * r


def _boxes(params: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(k, h, w) masks of k rotated rounded boxes, rows = (cx, cy, half w, half h, r, angle)."""
    cx, cy, hw, hh, r, ang = (params[:, j, None, None] for j in range(6))
    c, s = np.cos(ang), np.sin(ang)
    dx, dy = xs - cx, ys - cy
    # Shrink the box by the corner radius, then keep the points within that radius of it.
    qu = np.maximum(np.abs(c * dx + s * dy) - (hw - r), 0.0)
    qv = np.maximum(np.abs(c * dy - s * dx) - (hh - r), 0.0)
    return qu * qu + qv * qv <= r * r


def _blob(prim, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(h, w) mask of a rotated, stretched star-shaped blob r(t) = r0 (1 + sum a sin(k t + p))."""
    _, cx, cy, r0, sx, sy, ang, harm = prim
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = xs - cx, ys - cy
    pu = (c * dx + s * dy) * (1.0 / sx)
    pv = (c * dy - s * dx) * (1.0 / sy)
    rho2 = pu * pu + pv * pv
    if not harm:
        return rho2 <= r0 * r0
    theta = np.arctan2(pv, pu)
    radius = np.full(rho2.shape, r0, np.float32)
    for k, a, phase in harm:
        radius += (r0 * a) * np.sin(k * theta + phase)
    return rho2 <= radius * radius


class SyntheticScenes(SegmentationDataset):
    """Procedurally generated outdoor scenes with 8 classes (see the module docstring).

    Sample ``i`` of a split is a pure function of ``(seed, split, i)``: it is regenerated on every
    access from ``np.random.SeedSequence([seed, split_id, i])``, so splits are disjoint streams and
    every process sees the same images without storing any.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        length: number of images; default 2000 for train and 200 for val and test.
        size: (H, W) of the images, both at least 32 (an int means a square).
        seed: dataset seed; a different seed gives a different set of scenes.
        transform: joint image + mask transform, as in ``SegmentationDataset``.

    Raises:
        ValueError: on an unknown split, a negative length or a side shorter than 32 pixels.
    """

    info = SYNTHETIC_INFO

    def __init__(self, split: str = "train", length: int | None = None,
                 size: int | tuple[int, int] = (128, 128), seed: int = 0, transform=None):
        super().__init__(transform)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) for s in hw):
            raise ValueError(f"size must be an int or a pair of ints (H, W), got {size!r}")
        if min(hw) < MIN_SIDE:
            raise ValueError(
                f"size must be at least {MIN_SIDE}x{MIN_SIDE} pixels (H, W), got {hw[0]}x{hw[1]}; "
                "smaller scenes cannot hold the objects"
            )
        length = DEFAULT_LENGTHS[split] if length is None else length
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.split = split
        self.length = int(length)
        self.size = (int(hw[0]), int(hw[1]))
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def describe(self, i: int) -> str:
        return f"synthetic/{self.split}[{i}]"

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate sample ``i``.

        Returns:
            image (H, W, 3) uint8 and mask (H, W) int64 with labels in [0, 8).
        """
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for synthetic/{self.split} of length "
                             f"{self.length}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], int(i)]))
        scene = _Scene(rng, *self.size)
        inst = scene.regions().astype(np.intp)
        scene.objects(inst)
        image = scene.render(inst)
        mask = np.asarray(scene.classes, dtype=np.int64)[inst]
        return image, mask

    def tags(self, i: int) -> list[int]:
        """Sorted ids of the classes that occupy at least one pixel of sample ``i``'s mask."""
        _, mask = self.load(i)
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=self.num_classes)).tolist()
