"""Renderer for synthetic face identities: drawn faces with known 5 landmarks.

No real face data can be obtained where facekd is developed and demonstrated, so the
embedded default dataset is drawn. An *identity* is a vector of shape and appearance
parameters (head and jaw shape, eye/brow/nose/mouth geometry, skin and hair colours,
skin texture, moles, beard, glasses, ears). An *image* of it varies nuisances: head pose
(yaw and pitch on a simple 3D head model, so features shift, foreshorten and hide),
expression, age, hair jitter, background, lighting gradient, colour cast and gamma,
blur, noise, occluders and JPEG quality. Images are rendered straight into the aligned
frame: the similarity that maps the pose-dependent landmarks (plus detector noise) onto
the ArcFace template is applied to every drawing primitive, so the face looks like the
output of a real detector + ``norm_crop`` and its true landmarks are known exactly.

Drawing uses OpenCV primitives with sub-pixel coordinates and vectorised numpy for
shading, which renders several hundred 112x112 faces per second on one core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from facekd.data.align import ARCFACE_DST

SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
ONE = 1 << SHIFT

_IRIS_COLOURS = np.array(
    [[70, 45, 25], [110, 75, 40], [60, 100, 150], [80, 120, 80], [110, 115, 120], [35, 25, 20]],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [[25, 20, 18], [70, 45, 28], [120, 80, 45], [200, 165, 110], [150, 70, 35], [40, 30, 25]],
    dtype=np.float64,
)
_SKIN_LIGHT = np.array([238.0, 204.0, 180.0])
_SKIN_DARK = np.array([92.0, 60.0, 44.0])


@dataclass
class Identity:
    """Latent parameters of one synthetic person (all lengths in head half-widths)."""

    head_rx: float
    head_ry: float
    depth: float
    jaw: float
    chin: float
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: np.ndarray
    iris_r: float
    brow_dy: float
    brow_thick: float
    brow_len: float
    brow_angle: float
    brow_arch: float
    nose_y: float
    nose_w: float
    nose_len: float
    nose_depth: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lip_colour: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    hairline: float
    hair_volume: float
    hair_curve: float
    fringe: int
    beard: float
    beard_colour: np.ndarray
    ear_size: float
    texture: np.ndarray  # 8x8 low-frequency skin pattern
    texture_amp: float
    moles: np.ndarray  # k x 3: (phi, y, radius)
    blush: float
    age: float
    glasses: float  # probability an image shows glasses (0 for most people)
    glasses_colour: np.ndarray

    def vector(self) -> np.ndarray:
        """All parameters flattened (for checks that identities really differ)."""
        parts = []
        for name, value in self.__dict__.items():
            value = np.asarray(value, dtype=np.float64)
            if name == "moles":  # 0-3 moles: pad to a fixed length
                value = np.concatenate([value.reshape(-1, 3), np.zeros((3 - len(value), 3))])
            parts.append(np.ravel(value))
        return np.concatenate(parts)


@dataclass
class Nuisance:
    """Per-image variation that must not change who the face is."""

    yaw: float = 0.0
    pitch: float = 0.0
    landmark_noise: np.ndarray = field(default_factory=lambda: np.zeros((5, 2)))
    smile: float = 0.0
    mouth_open: float = 0.0
    eye_open: float = 1.0
    brow_raise: float = 0.0
    age: float = 0.0
    hair_jitter: float = 0.0
    background: np.ndarray = field(default_factory=lambda: np.full(3, 128.0))
    background_shapes: int = 0
    light_angle: float = 0.0
    light_strength: float = 0.0
    ambient: float = 1.0
    colour_gain: np.ndarray = field(default_factory=lambda: np.ones(3))
    gamma: float = 1.0
    blur: float = 0.0
    noise: float = 0.0
    occluder: int = 0  # 0 none, 1 patch, 2 sunglasses, 3 mask, 4 hand-like blob
    glasses: bool = False
    jpeg_quality: int = 92
    seed: int = 0  # for the few random details drawn inside render (clutter, occluder)


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw a new identity; every parameter is continuous so no two people coincide."""
    u = rng.uniform
    tone = u(0.0, 1.0) ** 1.2
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + rng.normal(0, 7, 3)
    skin[0] += u(0, 12)  # warmer red channel
    hair_mix = rng.dirichlet(np.full(len(_HAIR_COLOURS), 0.35))
    hair = hair_mix @ _HAIR_COLOURS + rng.normal(0, 8, 3)
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 12, 3)
    n_moles = int(rng.integers(0, 4))
    moles = np.column_stack([u(-0.9, 0.9, n_moles), u(-0.5, 0.8, n_moles),
                             u(0.012, 0.03, n_moles)])
    texture = rng.normal(0, 1, (8, 8)).astype(np.float32)
    has_beard = u() < 0.22
    return Identity(
        head_rx=u(0.86, 1.04),
        head_ry=u(1.18, 1.45),
        depth=u(0.95, 1.25),
        jaw=u(0.58, 0.92),
        chin=u(0.0, 0.3),
        eye_y=u(-0.30, -0.14),
        eye_dx=u(0.32, 0.42),
        eye_w=u(0.14, 0.22),
        eye_h=u(0.38, 0.6),
        eye_tilt=u(-0.14, 0.14),
        iris=np.clip(iris, 0, 255),
        iris_r=u(0.36, 0.5),
        brow_dy=u(0.13, 0.24),
        brow_thick=u(0.025, 0.075),
        brow_len=u(0.18, 0.3),
        brow_angle=u(-0.22, 0.22),
        brow_arch=u(0.0, 0.08),
        nose_y=u(0.1, 0.26),
        nose_w=u(0.09, 0.18),
        nose_len=u(0.18, 0.34),
        nose_depth=u(0.15, 0.35),
        mouth_y=u(0.52, 0.72),
        mouth_w=u(0.24, 0.36),
        lip_thick=u(0.03, 0.085),
        lip_colour=np.clip(skin * np.array([0.95, 0.62, 0.62]) + rng.normal(0, 8, 3), 0, 255),
        skin=np.clip(skin, 0, 255),
        hair=np.clip(hair, 0, 255),
        hairline=u(-1.05, -0.62),
        hair_volume=u(0.02, 0.35),
        hair_curve=u(-0.1, 0.35),
        fringe=int(rng.integers(0, 3)),
        beard=u(0.3, 0.85) if has_beard else 0.0,
        beard_colour=np.clip(hair * u(0.7, 1.0), 0, 255),
        ear_size=u(0.17, 0.28),
        texture=texture,
        texture_amp=u(0.02, 0.08),
        moles=moles,
        blush=u(0.0, 0.25),
        age=u(0.0, 0.6),
        glasses=0.8 if u() < 0.12 else 0.0,
        glasses_colour=rng.uniform(0, 120, 3),
    )


def sample_nuisance(
    rng: np.random.Generator,
    identity: Identity,
    *,
    yaw_deg: float | None = None,
    yaw_sigma_deg: float = 14.0,
    age: float | None = None,
    strength: float = 1.0,
) -> Nuisance:
    """Draw per-image variation; ``strength`` scales how hard same-identity matching is."""
    s = strength
    g = rng.standard_normal(20)
    f = rng.random(14)
    if yaw_deg is None:
        yaw_deg = float(np.clip(g[0] * yaw_sigma_deg * s, -50, 50))
    occ = f[0] / s if s > 0 else 1.0
    occluder = 1 if occ < 0.12 else 2 if occ < 0.16 else 3 if occ < 0.19 else 4 if occ < 0.24 else 0
    return Nuisance(
        yaw=float(np.deg2rad(yaw_deg)),
        pitch=float(np.deg2rad(np.clip(g[1] * 8 * s, -20, 20))),
        landmark_noise=g[10:20].reshape(5, 2) * (1.0 * s),
        smile=float(np.clip(0.2 + g[2] * 0.45 * s, -0.6, 1.0)),
        mouth_open=float(max(0.0, -0.1 + g[3] * 0.35 * s)),
        eye_open=float(np.clip(0.95 + g[4] * 0.2 * s, 0.1, 1.25)),
        brow_raise=float(g[5] * 0.03 * s),
        age=float(np.clip(identity.age + g[6] * 0.06 * s if age is None else age, 0, 1)),
        hair_jitter=float(g[7] * 0.05 * s),
        background=20 + 215 * f[1:4],
        background_shapes=int(f[4] * 4),
        light_angle=float(f[5] * 2 * np.pi),
        light_strength=float(f[6] * 0.55 * s),
        ambient=float(np.exp(g[8] * 0.18 * s)),
        colour_gain=np.exp(rng.standard_normal(3) * 0.07 * s),
        gamma=float(np.exp(g[9] * 0.15 * s)),
        blur=float(f[7] * 1.6 * s) if f[8] < 0.5 else 0.0,
        noise=float(f[9] * 9 * s),
        occluder=occluder,
        glasses=bool(f[10] < identity.glasses),
        jpeg_quality=int(70 + f[11] * 26),
        seed=int(f[12] * (2**31 - 1)),
    )


def half_width(ident: Identity, y: np.ndarray) -> np.ndarray:
    """Head half-width at height y: full at the cheeks, tapering to the jaw and chin."""
    t = np.minimum(np.maximum(y * (1.0 / ident.head_ry), -1.0), 1.0)
    one_minus = np.maximum(1.0 - t * t, 0.0)
    width = np.sqrt(one_minus)  # the upper half: an ellipse
    lower = t > 0
    if lower.any():
        tl = t[lower]
        width[lower] = one_minus[lower] ** (0.5 + ident.chin) * (
            1.0 - (1.0 - ident.jaw) * tl * np.sqrt(tl))
    return ident.head_rx * width


class _Geometry:
    """Collects the surface points one image needs and projects them in one pass.

    A point is (c, y, lift): ``c`` is either the frontal x or the horizontal angle phi on
    the head, ``y`` the height, ``lift`` extra depth (the nose). Projection turns the
    head by yaw and pitch (orthographic) and reports how much each point faces the
    camera (``vis``, the cosine of the turned surface angle).
    """

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._count = 0

    def add(self, c: np.ndarray | list, y: np.ndarray | list | float,
            lift: np.ndarray | list | float = 0.0, by_phi: bool = False) -> slice:
        c = np.asarray(c, dtype=np.float64)
        n = c.shape[0]
        y = np.full(n, y) if np.isscalar(y) else np.asarray(y, dtype=np.float64)
        lift = np.full(n, lift) if np.isscalar(lift) else np.asarray(lift, dtype=np.float64)
        self._parts.append((c, y, lift, np.full(n, by_phi)))
        sl = slice(self._count, self._count + n)
        self._count += n
        return sl

    def finish(self) -> None:
        """Concatenate the added parts into flat arrays."""
        self.c, self.y, self.lift, self.by_phi = (
            np.concatenate(a) for a in zip(*self._parts, strict=True))

    def project_points(self, c: np.ndarray, y: np.ndarray, ident: Identity, yaw: float,
                       pitch: float) -> _Geometry:
        """A projected copy for (c, y) replacing the stored coordinates."""
        out = _Geometry()
        out.c, out.y, out.lift, out.by_phi = c, y, self.lift, self.by_phi
        out.project(ident, yaw, pitch)
        return out

    def project(self, ident: Identity, yaw: float, pitch: float) -> None:
        c, y, lift, by_phi = self.c, self.y, self.lift, self.by_phi
        radius = np.maximum(half_width(ident, y), 0.05)
        phi = np.where(by_phi, c, np.arcsin(np.clip(c / radius, -0.999, 0.999)))
        sin_p, cos_p = np.sin(phi), np.cos(phi)
        sin_y, cos_y = np.sin(yaw), np.cos(yaw)
        x = radius * sin_p
        z = radius * cos_p * ident.depth + lift
        self.u = x * cos_y + z * sin_y
        z_turned = -x * sin_y + z * cos_y
        self.v = y * np.cos(pitch) + z_turned * np.sin(pitch) * 0.5
        self.vis = cos_p * cos_y - sin_p * sin_y


class _Layout:
    """Per-identity surface points (cached); an image only moves a few of them."""

    def __init__(self, ident: Identity) -> None:
        self.ident = ident
        geo = _Geometry()
        sl: dict[str, slice] = {}
        sl["lm"] = geo.add([-ident.eye_dx, ident.eye_dx, 0.0, -ident.mouth_w, ident.mouth_w],
                           [ident.eye_y, ident.eye_y, ident.nose_y, ident.mouth_y, ident.mouth_y],
                           [0.0, 0.0, ident.nose_depth, 0.0, 0.0])
        sl["ear"] = geo.add([-1.45, 1.45], (ident.eye_y + ident.nose_y) / 2, by_phi=True)
        sl["mole"] = geo.add(ident.moles[:, 0], ident.moles[:, 1], by_phi=True)
        sl["blush"] = geo.add([-0.5, 0.5], ident.nose_y + 0.08)
        if ident.beard > 0:
            bys = np.linspace(ident.mouth_y - 0.18, ident.head_ry, 10)
            bw = half_width(ident, bys) * 0.97
            sl["beard"] = geo.add(np.concatenate([-bw, bw[::-1]]),
                                  np.concatenate([bys, bys[::-1]]))
        for k in range(4):
            fy = ident.eye_y - ident.brow_dy - 0.12 - 0.07 * k
            sl[f"wrinkle{k}"] = geo.add(_LIN7, fy + 0.015 * np.cos(_LIN7 * 6))
        for k, side in enumerate((-1.0, 1.0)):
            sl[f"fold{k}"] = geo.add(
                side * np.linspace(ident.nose_w * 1.3, ident.mouth_w * 1.15, 5),
                np.linspace(ident.nose_y, ident.mouth_y + 0.05, 5))
        brow_y = ident.eye_y - ident.brow_dy
        for k, side in enumerate((-1.0, 1.0)):
            xs = side * ident.eye_dx + _LIN6 * ident.brow_len * side
            ys = brow_y + (xs - side * ident.eye_dx) * ident.brow_angle * side \
                - ident.brow_arch * (1 - _LIN6**2)
            sl[f"brow{k}"] = geo.add(xs, ys)
        sl["nose"] = geo.add(ident.nose_w * 0.35 * _T6,
                             ident.nose_y - ident.nose_len + _T6 * ident.nose_len,
                             ident.nose_depth * _T6)
        sl["nostril"] = geo.add([-ident.nose_w * 0.55, ident.nose_w * 0.55],
                                ident.nose_y + 0.03, ident.nose_depth * 0.5)
        curve = ident.hair_curve * (1 - np.cos(_PHI17)) * 0.5
        if ident.fringe == 1:
            curve = curve + 0.08 * np.abs(np.sin(_PHI17 * 5))
        elif ident.fringe == 2:
            curve = curve + 0.18 * (_PHI17 + 1.45) / 2.9
        sl["hair"] = geo.add(_PHI17, curve + ident.hairline, by_phi=True)
        sl["top"] = geo.add(_PHI17[::-1], -ident.head_ry * 1.02, by_phi=True)
        geo.finish()
        self.base = geo
        self.slices = sl
        self.outline_y = np.linspace(-ident.head_ry, ident.head_ry, 28)
        self.outline_w = half_width(ident, self.outline_y)

    def hairline_shift(self, nuis: Nuisance, age: float) -> float:
        return nuis.hair_jitter + 0.1 * age * (self.ident.hairline > -0.9)

    def hairline(self, nuis: Nuisance, age: float) -> float:
        return self.ident.hairline + self.hairline_shift(nuis, age)

    def geometry(self, nuis: Nuisance, age: float, sin_yaw: float) -> _Geometry:
        """This image's points: expression, brow raise and hair jitter applied, projected."""
        ident, sl = self.ident, self.slices
        c, y = self.base.c.copy(), self.base.y.copy()
        lm = sl["lm"].start
        mouth_w = ident.mouth_w * (1 + 0.12 * nuis.smile)
        c[lm + 3], c[lm + 4] = -mouth_w, mouth_w
        y[lm + 3] = y[lm + 4] = ident.mouth_y - 0.05 * nuis.smile
        y[sl["brow0"].start:sl["brow1"].stop] -= nuis.brow_raise
        y[sl["hair"]] += self.hairline_shift(nuis, age)
        if sin_yaw >= 0:  # the bridge line is drawn on the side turned away
            c[sl["nose"]] *= -1.0
        return self.base.project_points(c, y, ident, nuis.yaw, nuis.pitch)


def _fast_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2D similarity in closed form (complex numbers); same optimum as Umeyama."""
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    ms, md = zs.mean(), zd.mean()
    zs = zs - ms
    a = np.vdot(zs, zd - md) / np.vdot(zs, zs).real
    t = md - a * ms
    return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]])


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates to OpenCV fixed point (int32, SHIFT fractional bits)."""
    return np.round(points * ONE).astype(np.int32)


def _pt(point: np.ndarray) -> tuple[int, int]:
    return (round(point[0] * ONE), round(point[1] * ONE))


def _colour(rgb: np.ndarray) -> tuple[float, float, float]:
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]))


def _scaled(rgb: list[float], factor: float) -> tuple[float, float, float]:
    return (rgb[0] * factor, rgb[1] * factor, rgb[2] * factor)


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        _GRID_CACHE[size] = (np.ascontiguousarray(np.broadcast_to(lin[None, :], (size, size))),
                             np.ascontiguousarray(np.broadcast_to(lin[:, None], (size, size))))
    return _GRID_CACHE[size]


_LIN6 = np.linspace(-1.0, 1.0, 6)
_LIN7 = np.linspace(-0.35, 0.35, 7)
_T6 = np.linspace(0.0, 1.0, 6)
_PHI17 = np.linspace(-1.45, 1.45, 17)
_ARC24 = np.linspace(-np.pi, 0.0, 24)
_T11 = np.linspace(-1.0, 1.0, 11)
_BEND11 = 1.0 - _T11**2
_GREY_HAIR = np.array([185.0, 185.0, 190.0])
_BLUSH = np.array([200.0, 60.0, 60.0])


class _Frame:
    """One image's pose and colours, shared by the drawing steps of :meth:`FaceRenderer.render`.

    ``sl`` names the layout's point slices; ``fx`` / ``pts`` are every projected point in
    OpenCV fixed point (array / Python lists), ``vis`` / ``visl`` how much each faces the
    camera; ``matrix`` maps head-model (u, v) to pixels, ``scale`` and ``angle`` are its
    size and rotation.
    """

    ident: Identity
    nuis: Nuisance
    layout: _Layout
    sl: dict[str, slice]
    size: int
    age: float
    sin_yaw: float
    wrinkle_sls: list[slice]
    front_hair: bool
    matrix: np.ndarray
    scale: float
    angle: float
    lm_px: np.ndarray
    fx: np.ndarray
    pts: list
    vis: np.ndarray
    visl: list
    hair: np.ndarray
    skin: np.ndarray
    skin_l: list
    widen: float
    vol: float

    def to_px(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Head-model points (u, v) in OpenCV fixed-point pixels."""
        return _fixed(np.stack([u, v], axis=1) @ self.matrix[:, :2].T + self.matrix[:, 2])


def _background(size: int, nuis: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """A flat background with the nuisance's clutter ellipses (drawn from ``rng``)."""
    import cv2

    img = np.empty((size, size, 3), np.uint8)
    img[:] = [min(255, max(0, int(c))) for c in nuis.background.tolist()]
    if nuis.background_shapes:
        clutter = rng.random((nuis.background_shapes, 8))
        for row in clutter:
            cv2.ellipse(img, (int(row[0] * size * ONE), int(row[1] * size * ONE)),
                        (int((5 + row[2] * size / 2) * ONE), int((5 + row[3] * size) * ONE)),
                        float(row[4] * 180), 0, 360,
                        (float(row[5] * 255), float(row[6] * 255), float(row[7] * 255)), -1,
                        cv2.LINE_8, SHIFT)  # background: no anti-aliasing needed
    return img


class FaceRenderer:
    """Renders identities under nuisances; caches per-identity upsampled textures."""

    def __init__(self, size: int = 112) -> None:
        self.size = size
        self._texture_cache: dict[tuple[int, int], np.ndarray] = {}
        self._layout_cache: dict[int, _Layout] = {}

    def _layout(self, identity_key: int, ident: Identity) -> _Layout:
        layout = self._layout_cache.get(identity_key)
        if layout is None or layout.ident is not ident:
            if len(self._layout_cache) > 4096:
                self._layout_cache.clear()
            layout = self._layout_cache[identity_key] = _Layout(ident)
        return layout

    def render(
        self,
        ident: Identity,
        nuis: Nuisance,
        identity_key: int = 0,
        target: np.ndarray | None = None,
        size: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw one image; returns (uint8 HxWx3 RGB, true 5x2 landmarks in pixels).

        ``target`` gives where the landmarks should land (the ArcFace template for
        aligned faces, a larger random similarity of it for loose crops); the
        nuisance's landmark noise perturbs the alignment like a detector would. ``rng``
        draws the small random details (clutter, occluder shape, noise window); by
        default it is seeded from ``nuis.seed`` (passing one saves its construction).
        """
        size = size or self.size
        if target is None:
            target = ARCFACE_DST.astype(np.float64) * (size / 112.0)
        f = self._pose(ident, nuis, identity_key, target, size)
        if rng is None:
            rng = np.random.default_rng(nuis.seed)
        img = _background(size, nuis, rng)
        self._draw_back_hair(img, f)
        self._draw_ears(img, f)
        mask = self._draw_head(img, f)
        self._draw_skin_marks(img, f)
        self._draw_eyes_and_brows(img, f)
        self._draw_nose(img, f)
        self._draw_mouth(img, ident, nuis, f.scale, f.lm_px)
        self._draw_front_hair(img, f)
        if nuis.glasses:
            self._draw_glasses(img, ident, f.scale, f.angle, f.lm_px)
        if nuis.occluder:
            self._draw_occluder(img, ident, nuis, f.scale, f.angle, rng, f.lm_px, f.skin)
        shade = self._skin_shade(f, identity_key, mask)
        return self._photometric(img, shade, nuis, rng), f.lm_px

    # ----------------------------------------------------------------- pose
    def _pose(self, ident: Identity, nuis: Nuisance, identity_key: int, target: np.ndarray,
              size: int) -> _Frame:
        """Every surface point of this image projected at once, and the similarity that
        puts its landmarks (plus the nuisance's detector noise) on ``target``."""
        f = _Frame()
        f.ident, f.nuis, f.size = ident, nuis, size
        age = f.age = nuis.age
        sin_yaw = f.sin_yaw = np.sin(nuis.yaw)
        layout = self._layout(identity_key, ident)
        sl = f.sl = layout.slices
        f.layout = layout
        geo = layout.geometry(nuis, age, sin_yaw)
        f.wrinkle_sls = []
        if age > 0.35:
            f.wrinkle_sls = [sl[f"wrinkle{k}"] for k in range(1 + int((age - 0.35) / 0.65 * 3))]
            f.wrinkle_sls += [sl["fold0"], sl["fold1"]]
        f.front_hair = layout.hairline(nuis, age) > -ident.head_ry + 0.05
        lm_model = np.stack([geo.u[sl["lm"]], geo.v[sl["lm"]]], axis=1)
        matrix = f.matrix = _fast_similarity(lm_model, target + nuis.landmark_noise)
        f.scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
        f.angle = float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))
        px = np.stack([geo.u, geo.v], axis=1) @ matrix[:, :2].T + matrix[:, 2]
        f.lm_px = px[sl["lm"]]
        f.fx = _fixed(px)  # every point in OpenCV fixed point, once
        f.pts = f.fx.tolist()  # python scalars: far cheaper to index than numpy rows
        f.vis = geo.vis
        f.visl = f.vis.tolist()
        hair_mix = min(max((age - 0.45) * 1.6, 0.0), 0.85)
        f.hair = ident.hair * (1 - hair_mix) + _GREY_HAIR * hair_mix
        f.skin = ident.skin * (1 - 0.08 * age)
        f.skin_l = f.skin.tolist()
        f.widen = math.sqrt(math.cos(nuis.yaw) ** 2 + (ident.depth * sin_yaw) ** 2)
        f.vol = ident.hair_volume * (1 - 0.5 * age)
        return f

    # ----------------------------------------------------------------- head
    @staticmethod
    def _draw_back_hair(img: np.ndarray, f: _Frame) -> None:
        """The hair behind the head, when there is any."""
        import cv2

        ident, vol, sin_yaw = f.ident, f.vol, f.sin_yaw
        if ident.hairline > -1.0 or vol > 0.05:
            hb_u = (ident.head_rx + vol) * 1.02 * np.cos(_ARC24) * f.widen - 0.25 * sin_yaw
            hb_v = -0.15 * ident.head_ry + (ident.head_ry * 0.98 + vol) * np.sin(_ARC24)
            low = ident.eye_y + 0.25 + vol
            hb_u = np.concatenate([hb_u, [hb_u[-1], hb_u[0]]])
            hb_v = np.concatenate([hb_v, [low, low]])
            cv2.fillPoly(img, [f.to_px(hb_u, hb_v)], _colour(f.hair), cv2.LINE_AA, SHIFT)

    @staticmethod
    def _draw_ears(img: np.ndarray, f: _Frame) -> None:
        """Ears at the silhouette, narrowing as they turn away."""
        import cv2

        ear_sl, ident, scale = f.sl["ear"], f.ident, f.scale
        for k in range(ear_sl.start, ear_sl.stop):
            ev = f.visl[k]
            if ev > -0.35:
                axes = (int(scale * ident.ear_size * 0.55 * min(1.0, max(0.25, ev + 0.6)) * ONE),
                        int(scale * ident.ear_size * ONE))
                cv2.ellipse(img, f.pts[k], axes, f.angle, 0, 360, _scaled(f.skin_l, 0.9), -1,
                            cv2.LINE_AA, SHIFT)

    @staticmethod
    def _draw_head(img: np.ndarray, f: _Frame) -> np.ndarray:
        """The head silhouette in skin colour; returns its mask (1 on the face)."""
        import cv2

        size, layout = f.size, f.layout
        ys = layout.outline_y
        widths = layout.outline_w * f.widen
        face_poly = f.to_px(np.concatenate([-widths, widths[::-1]]),
                            np.concatenate([ys, ys[::-1]]) * np.cos(f.nuis.pitch))
        cv2.fillPoly(img, [face_poly], _scaled(f.skin_l, 1.0), cv2.LINE_AA, SHIFT)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [face_poly], 1, cv2.LINE_8, SHIFT)
        return mask

    @staticmethod
    def _draw_skin_marks(img: np.ndarray, f: _Frame) -> None:
        """Moles, blush, beard and (with age) wrinkles."""
        import cv2

        aa = cv2.LINE_AA
        ident, sl, scale, angle, pts, visl = f.ident, f.sl, f.scale, f.angle, f.pts, f.visl
        skin, skin_l = f.skin, f.skin_l
        mole_sl, blush_sl, beard_sl = sl["mole"], sl["blush"], sl.get("beard")
        mole_r = ident.moles[:, 2].tolist()
        for k in range(mole_sl.start, mole_sl.stop):
            mv = visl[k]
            if mv > 0.2:
                r = max(scale * mole_r[k - mole_sl.start], 0.6)
                cv2.ellipse(img, pts[k], (int(r * mv * ONE) + 1, int(r * ONE)), angle, 0, 360,
                            _scaled(skin_l, 0.55), -1, aa, SHIFT)
        if ident.blush > 0.05:
            blush = skin * (1 - ident.blush * 0.5) + _BLUSH * ident.blush * 0.5
            for k in range(blush_sl.start, blush_sl.stop):
                bv = visl[k]
                if bv > 0.1:
                    cv2.ellipse(img, pts[k], (int(scale * 0.16 * bv * ONE),
                                              int(scale * 0.1 * ONE)), angle, 0, 360,
                                _colour(blush), -1, aa, SHIFT)
        if beard_sl is not None:
            beard = skin * (1 - ident.beard) + ident.beard_colour * ident.beard
            cv2.fillPoly(img, [f.fx[beard_sl]], _colour(beard), aa, SHIFT)
        if f.wrinkle_sls:
            line_col = _scaled(skin_l, 1 - 0.35 * (f.age - 0.35) / 0.65)
            thick = max(1, round(scale * 0.012))
            cv2.polylines(img, [f.fx[w] for w in f.wrinkle_sls], False, line_col, thick, aa,
                          SHIFT)

    @staticmethod
    def _draw_eyes_and_brows(img: np.ndarray, f: _Frame) -> None:
        """Each eye (white, iris, pupil, lid) foreshortened by its turn, and its brow."""
        import cv2

        aa = cv2.LINE_AA
        ident, nuis, scale, angle, pts = f.ident, f.nuis, f.scale, f.angle, f.pts
        lm_sl, brow_sls = f.sl["lm"], (f.sl["brow0"], f.sl["brow1"])
        lid_col = _scaled(f.skin_l, 0.35)
        lid_thick = max(1, round(scale * 0.02))
        iris_col = _colour(ident.iris)
        brow_col = _colour(ident.hair * 0.8 * (1 - 0.4 * max(0.0, f.age - 0.6)))
        brow_thick = max(1, round(scale * ident.brow_thick))
        for k, side in ((0, -1.0), (1, 1.0)):
            fore = min(max(f.visl[lm_sl.start + k], 0.0), 1.0)
            if fore >= 0.12:
                cx, cy = pts[lm_sl.start + k]
                cx, cy = cx / ONE, cy / ONE
                tilt = angle + math.degrees(side * ident.eye_tilt)
                w = scale * ident.eye_w * fore
                h = scale * ident.eye_w * ident.eye_h * nuis.eye_open
                centre = pts[lm_sl.start + k]
                if h > 0.8:
                    cv2.ellipse(img, centre, (int(w * ONE), int(h * ONE)), tilt, 0, 360,
                                (235, 232, 228), -1, aa, SHIFT)
                    r = scale * ident.eye_w * ident.iris_r
                    ic = (int((cx - f.sin_yaw * w * 0.25) * ONE), int(cy * ONE))
                    cv2.ellipse(img, ic, (int(r * fore * ONE), int(min(r, h * 1.1) * ONE)), angle,
                                0, 360, iris_col, -1, aa, SHIFT)
                    cv2.ellipse(img, ic, (int(r * 0.45 * fore * ONE), int(min(r * 0.45, h) * ONE)),
                                angle, 0, 360, (15, 12, 12), -1, aa, SHIFT)
                cv2.ellipse(img, centre, (int(w * ONE), int(max(h, 0.5) * ONE)), tilt, 180, 360,
                            lid_col, lid_thick, aa, SHIFT)
            keep = f.vis[brow_sls[k]] > 0.1
            if keep.sum() >= 2:
                cv2.polylines(img, [f.fx[brow_sls[k]][keep]], False, brow_col, brow_thick, aa,
                              SHIFT)

    @staticmethod
    def _draw_nose(img: np.ndarray, f: _Frame) -> None:
        """The bridge line towards the hidden side, and the nostrils."""
        import cv2

        aa = cv2.LINE_AA
        scale, nostril_sl = f.scale, f.sl["nostril"]
        cv2.polylines(img, [f.fx[f.sl["nose"]]], False, _scaled(f.skin_l, 0.7),
                      max(1, round(scale * 0.025)), aa, SHIFT)
        for k in range(nostril_sl.start, nostril_sl.stop):
            nv = f.visl[k]
            if nv > 0.15:
                cv2.ellipse(img, f.pts[k], (int(scale * f.ident.nose_w * 0.3 * nv * ONE) + 1,
                                            int(scale * 0.025 * ONE) + 1), f.angle, 0, 360,
                            _scaled(f.skin_l, 0.45), -1, aa, SHIFT)

    @staticmethod
    def _draw_front_hair(img: np.ndarray, f: _Frame) -> None:
        """The forehead above the hairline, when the hairline is on the face."""
        import cv2

        if f.front_hair:
            hair_sl = f.sl["hair"]
            keep = f.vis[hair_sl] > -0.6
            if keep.sum() >= 2:
                top = f.fx[f.sl["top"]][keep[::-1]] \
                    - np.array([0, round(f.vol * f.scale * ONE)], np.int32)
                cv2.fillPoly(img, [np.concatenate([f.fx[hair_sl][keep], top])], _colour(f.hair),
                             cv2.LINE_AA, SHIFT)

    def _skin_shade(self, f: _Frame, identity_key: int, mask: np.ndarray) -> np.ndarray:
        """1 + the identity's skin texture on the face (moved with the head's turn)."""
        import cv2

        size = f.size
        tex = self._texture(identity_key, f.ident, size)
        pad = (tex.shape[1] - size) // 2
        start = pad - min(pad, max(-pad, round(f.scale * 0.6 * f.sin_yaw)))
        tex = tex[:, start:start + size]
        amp = float(f.ident.texture_amp * (1 + 1.5 * f.age))
        shade = cv2.multiply(tex, mask, scale=amp, dtype=cv2.CV_32F)
        shade += 1.0
        return shade

    # ----------------------------------------------------------------- features
    @staticmethod
    def _draw_mouth(img: np.ndarray, ident: Identity, nuis: Nuisance, scale: float,
                    lm_px: np.ndarray) -> None:
        import cv2

        aa = cv2.LINE_AA
        left, right = lm_px[3], lm_px[4]
        half = float(np.linalg.norm(right - left)) / 2 + 1e-6
        ax = (right - left) / (2 * half)
        down = np.array([-ax[1], ax[0]])
        smile = nuis.smile * scale * 0.06
        open_px = nuis.mouth_open * scale * 0.12
        lip = scale * ident.lip_thick
        centre_line = ((left + right) / 2)[None] + (_T11 * half)[:, None] * ax[None] \
            + (_BEND11 * smile)[:, None] * down
        upper = centre_line - (_BEND11 * (lip * 0.9 + open_px * 0.5))[:, None] * down
        lower = centre_line + (_BEND11 * (lip * 1.1 + open_px))[:, None] * down
        cv2.fillPoly(img, [_fixed(np.concatenate([upper, lower[::-1]]))],
                     _colour(ident.lip_colour), aa, SHIFT)
        if open_px > 0.8:
            inner = np.concatenate([centre_line - (_BEND11 * open_px * 0.45)[:, None] * down,
                                    (centre_line + (_BEND11 * open_px * 0.55)[:, None] * down)
                                    [::-1]])
            cv2.fillPoly(img, [_fixed(inner)], (60, 25, 30), aa, SHIFT)
        else:
            cv2.polylines(img, [_fixed(centre_line)], False, _colour(ident.lip_colour * 0.5),
                          max(1, round(scale * 0.012)), aa, SHIFT)

    @staticmethod
    def _draw_glasses(img: np.ndarray, ident: Identity, scale: float, angle: float,
                      lm_px: np.ndarray) -> None:
        import cv2

        aa = cv2.LINE_AA
        r = scale * ident.eye_w * 1.35
        colour = _colour(ident.glasses_colour)
        thick = max(1, round(scale * 0.02))
        for k in (0, 1):
            cv2.ellipse(img, _pt(lm_px[k]), (int(r * ONE), int(r * 0.75 * ONE)), angle, 0, 360,
                        colour, thick, aa, SHIFT)
        a, b = lm_px[0], lm_px[1]
        d = (b - a) / (np.linalg.norm(b - a) + 1e-6)
        cv2.line(img, _pt(a + d * r), _pt(b - d * r), colour, thick, aa, SHIFT)

    @staticmethod
    def _draw_occluder(img: np.ndarray, ident: Identity, nuis: Nuisance, scale: float,
                       angle: float, rng: np.random.Generator, lm_px: np.ndarray,
                       skin: np.ndarray) -> None:
        import cv2

        aa = cv2.LINE_AA
        size = img.shape[0]
        if nuis.occluder == 1:  # a random patch (object, shadow, sticker)
            c = lm_px.mean(axis=0) + rng.normal(0, scale * 0.5, 2)
            axes = rng.uniform(0.12, 0.35, 2) * scale
            box = cv2.boxPoints(((float(c[0]), float(c[1])),
                                 (float(axes[0] * 2), float(axes[1] * 2)),
                                 float(rng.uniform(0, 180))))
            cv2.fillPoly(img, [_fixed(box)], _colour(rng.uniform(0, 255, 3)), aa, SHIFT)
        elif nuis.occluder == 2:  # sunglasses
            r = scale * ident.eye_w * 1.3
            for k in (0, 1):
                cv2.ellipse(img, _pt(lm_px[k]), (int(r * ONE), int(r * 0.8 * ONE)), angle, 0, 360,
                            (20, 20, 25), -1, aa, SHIFT)
        elif nuis.occluder == 3:  # a face mask over nose and mouth
            a, b, nose = lm_px[3], lm_px[4], lm_px[2]
            w = float(np.linalg.norm(b - a)) * 1.1
            d = (b - a) / (np.linalg.norm(b - a) + 1e-6)
            down = np.array([-d[1], d[0]])
            top = nose - down * scale * 0.05
            pts = np.array([top - d * w, top + d * w, top + d * w * 0.8 + down * w * 1.3,
                            top - d * w * 0.8 + down * w * 1.3])
            cv2.fillPoly(img, [_fixed(pts)], _colour(rng.uniform(120, 250, 3)), aa, SHIFT)
        else:  # a hand-like skin-coloured bar entering from the image border
            edge = int(rng.integers(4))
            along = rng.uniform(0, size)
            start = np.array([[0, along], [size, along], [along, 0], [along, size]][edge], float)
            end = start + (lm_px[int(rng.integers(5))] - start) * rng.uniform(0.6, 1.0)
            colour = _colour(np.clip(skin * rng.uniform(0.8, 1.2, 3), 0, 255))
            cv2.line(img, _pt(start), _pt(end), colour,
                     max(2, int(scale * rng.uniform(0.25, 0.45))), aa, SHIFT)

    def _texture(self, identity_key: int, ident: Identity, size: int) -> np.ndarray:
        """Identity skin pattern upsampled to the image size, plus half a width of margin
        on each side (reflected) so a turned head takes a shifted window (cached)."""
        import cv2

        key = (identity_key, size)
        tex = self._texture_cache.get(key)
        if tex is None:
            tex = cv2.resize(ident.texture, (size, size), interpolation=cv2.INTER_CUBIC)
            tex = cv2.copyMakeBorder(tex, 0, 0, size // 2, size // 2, cv2.BORDER_REFLECT)
            if len(self._texture_cache) > 4096:
                self._texture_cache.clear()
            self._texture_cache[key] = tex
        return tex

    @staticmethod
    def _photometric(img: np.ndarray, shade: np.ndarray, nuis: Nuisance,
                     rng: np.random.Generator) -> np.ndarray:
        """Skin texture, lighting gradient, colour cast, gamma, blur and sensor noise.

        Kept in uint8 with OpenCV calls (a lookup table for gain and gamma) because
        float passes over the image dominated the render time.
        """
        import cv2

        size = img.shape[0]
        gx, gy = _grid(size)
        strength = nuis.light_strength
        light = cv2.addWeighted(gx, float(strength * np.cos(nuis.light_angle)), gy,
                                float(strength * np.sin(nuis.light_angle)), 1.0)
        light = cv2.multiply(light, shade)
        light8 = cv2.convertScaleAbs(light, alpha=128.0 * nuis.ambient)
        out = cv2.multiply(img, cv2.merge([light8, light8, light8]), scale=1.0 / 128.0)
        table = np.clip(_LEVELS[:, None] * nuis.colour_gain[None, :], 0.0, 1.0)
        table = np.clip(table ** nuis.gamma * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out = cv2.LUT(out, table.reshape(256, 1, 3))
        if nuis.blur > 0.25:
            out = cv2.GaussianBlur(out, (0, 0), nuis.blur)
        if nuis.noise > 0.5:
            k = float(nuis.noise / _NOISE_STD)
            out = cv2.addWeighted(out, 1.0, _noise_field(size, rng), k, -128.0 * k)
        return out


_LEVELS = np.arange(256, dtype=np.float64) / 255.0
_NOISE_STD = 32.0
_NOISE_BANK: dict[int, np.ndarray] = {}


def _noise_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (uint8, mean 128): a window of a fixed bank, far cheaper than drawing."""
    bank = _NOISE_BANK.get(size)
    if bank is None:
        normal = np.random.default_rng(12345).standard_normal((size * 3, size * 3, 3))
        bank = np.clip(128.0 + _NOISE_STD * normal, 0, 255).astype(np.uint8)
        _NOISE_BANK[size] = bank
    y, x = rng.integers(0, 2 * size, 2)
    return bank[y:y + size, x:x + size]


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes as OpenCV (and so MXNet's ``pack_img``) writes them: BGR order."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 images
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
