"""Synthetic torso phantoms (CT or MR-like) with organ labels: sample studies, training and rehearsal data.

Used by ``sample-datasets/make_samples.py`` (the command line that writes sample studies for a new server), for
the bundled model's training data (its model card), and by the app's trainer, which rehearses phantoms like
the ones the bundled model learned from while it fine-tunes on a user's labels (``rehearsal``).

:func:`write_dataset` with ``layout="studies"`` writes a MONAI Label studies folder: images ``DIR/<case>.nii.gz``
at the top level and labels ``DIR/labels/final/<case>.nii.gz`` (MONAI Label's local datastore convention);
``unlabeled=K`` puts the labels of the last K cases in ``DIR/ground_truth/`` instead, which MONAI Label does not
read, so the server offers those studies as unlabelled ones while their reference masks stay at hand.
``layout="training"`` writes the Medical Segmentation Decathlon layout ``DIR/imagesTr`` + ``DIR/labelsTr`` (what
``pretrain/`` and the evaluator read, the same layout as ``../shared/data/<dataset>``). Both write
``DIR/dataset.json`` with the label names and per-case metadata.

How a phantom is made: every anatomical part is an analytic shape (deformed ellipsoids, super-elliptic
body outline, periodic vertebrae/ribs, smooth random fields) evaluated in patient space, LPS millimetres
(x towards the patient's left, y posterior, z superior; origin near the dome of the diaphragm). The voxel
grid of each case has its own spacing and orientation (LPS, RAS or LAS storage, or an oblique direction), so
the stored arrays really differ while the anatomy stays consistent with the NIfTI affine. Intensities are
Hounsfield units: hard-edged tissue classes, a small texture field, Gaussian partial-volume blur, correlated
noise, and -1024 outside the circular reconstruction field of view. Labels are the hard (unblurred) masks.

``modality="mr"`` renders the same anatomy with MR-like tissue signal instead (T1-weighted even cases,
T2-weighted odd ones, contrast-enhanced T1 for the portal-venous draws, a smooth bias field, Rician noise, no
table or FOV circle), so training data is not all CT; MR draws use their own random stream, so the CT cases of
a seed do not change.

Everything derives from ``numpy.random.default_rng([seed, case_index])``: the same seed gives identical
arrays, and case ``i`` does not depend on how many cases are written.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Label values written into the label maps (MSD-style ``dataset.json`` "labels").
LABELS: Dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "lung_right",
    6: "lung_left",
    7: "vertebrae",
    8: "aorta",
}

#: Storage orientations cycled through by case index (``oblique`` = LPS rotated about z and tilted about x).
ORIENTATIONS: Tuple[str, ...] = ("LPS", "RAS", "oblique", "LAS")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

Array = np.ndarray


# --------------------------------------------------------------------------------------------------- geometry
@dataclass
class Grid:
    """A voxel grid in LPS patient space.

    World position (LPS mm) of voxel index ``(i, j, k)`` (array axes 0, 1, 2) is
    ``origin + direction @ (spacing * (i, j, k))``; axis 2 is always the slice axis.
    """

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    direction: Array  # (3, 3), columns = LPS unit vectors of array axes 0, 1, 2
    origin: Array  # (3,), LPS mm of voxel (0, 0, 0)
    orientation: str  # one of ORIENTATIONS

    @property
    def matrix(self) -> Array:
        """(3, 3) index -> LPS mm linear part (direction scaled by spacing)."""
        return self.direction * np.asarray(self.spacing)[None, :]

    @property
    def affine_ras(self) -> Array:
        """(4, 4) NIfTI affine: voxel index -> RAS mm."""
        aff = np.eye(4)
        aff[:3, :3] = _LPS_TO_RAS @ self.matrix
        aff[:3, 3] = _LPS_TO_RAS @ self.origin
        return aff

    def world(self, box: Optional[Tuple[slice, slice, slice]] = None) -> Tuple[Array, Array, Array]:
        """LPS coordinates (X, Y, Z) of the voxels in ``box`` (default all), each float32 of the box's shape."""
        box = box or tuple(slice(0, n) for n in self.shape)
        idx = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
        m = self.matrix.astype(np.float32)
        o = self.origin.astype(np.float32)
        out = []
        for r in range(3):
            out.append(o[r] + m[r, 0] * idx[0][:, None, None] + m[r, 1] * idx[1][None, :, None]
                       + m[r, 2] * idx[2][None, None, :])
        return tuple(out)  # type: ignore[return-value]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Optional[Tuple[slice, slice, slice]]:
        """Voxel slices covering the LPS world box ``[lo, hi]`` (None if it misses the grid)."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = np.linalg.solve(self.matrix, (corners - self.origin).T).T
        start = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
        stop = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


def _rotation(axis: str, degrees: float) -> Array:
    """(3, 3) right-handed rotation about the world axis ``"x"``, ``"y"`` or ``"z"``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def make_grid(rng: np.random.Generator, orientation: str, in_plane: int, body_width_mm: float,
              center_xy: Sequence[float], z_top: float) -> Grid:
    """A CT-like grid: ``in_plane``^2 pixels covering the body with margin, 60-120 slices of 2.5/3/5 mm.

    The grid is centred on ``center_xy`` (LPS mm) in-plane and its top slice is at about ``z_top`` mm.

    In-plane spacing follows from the field of view (10-20 % wider than the body), so ``in_plane=256`` gives
    about 1.3-1.6 mm pixels and ``512`` the clinical 0.65-0.8 mm.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {ORIENTATIONS}")
    if in_plane < 32:
        raise ValueError(f"in_plane={in_plane} is too small; use at least 32 pixels")
    fov = body_width_mm * rng.uniform(1.10, 1.20)
    dxy = fov / in_plane
    dz = float(rng.choice([2.5, 3.0, 5.0]))
    nz = int(np.clip(round(rng.uniform(280.0, 330.0) / dz), 60, 120))
    if orientation == "LPS":
        direction = np.eye(3)
    elif orientation == "RAS":
        direction = np.diag([-1.0, -1.0, 1.0])
    elif orientation == "LAS":
        direction = np.diag([1.0, -1.0, 1.0])
    else:  # oblique: patient rotated on the table plus a gantry-like tilt
        direction = _rotation("z", rng.uniform(6, 15) * rng.choice([-1, 1])) @ _rotation(
            "x", rng.uniform(4, 10) * rng.choice([-1, 1]))
    spacing = (dxy, dxy, dz)
    shape = (in_plane, in_plane, nz)
    half_extent = direction @ (np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0)
    center = np.array([center_xy[0], center_xy[1], z_top - dz * (nz - 1) / 2.0])
    origin = center - half_extent
    return Grid(shape=shape, spacing=spacing, direction=direction, origin=origin, orientation=orientation)


# ------------------------------------------------------------------------------------------ random helpers
@dataclass
class Field:
    """Smooth random scalar field in world mm: a normalised sum of random plane waves (roughly N(0, 1))."""

    k: Array  # (n, 3) wave vectors, rad/mm
    phase: Array  # (n,)

    @classmethod
    def draw(cls, rng: np.random.Generator, wavelength_mm: Tuple[float, float], n: int = 6) -> "Field":
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength_mm, size=n)
        return cls(k=dirs * (2 * np.pi / lam)[:, None], phase=rng.uniform(0, 2 * np.pi, size=n))

    def __call__(self, x: Array, y: Array, z: Array) -> Array:
        out = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float32)
        for (kx, ky, kz), ph in zip(self.k.astype(np.float32), self.phase.astype(np.float32)):
            out += np.sin(kx * x + ky * y + kz * z + ph)
        return out * np.float32(math.sqrt(2.0 / len(self.phase)))


@dataclass
class Blob:
    """A smoothly deformed, rotated ellipsoid: inside where ``|u| < 1 + sum_k a_k sin(w_k . u + phi_k)``.

    ``u = R^T (p - center) / radii`` are the normalised body coordinates (p in LPS mm).
    """

    center: Array
    radii: Array
    rotation: Array
    w: Array
    amp: Array
    phase: Array

    @classmethod
    def draw(cls, rng: np.random.Generator, center: Sequence[float], radii: Sequence[float],
             rotation: Optional[Array] = None, roughness: float = 0.06, jitter_mm: float = 6.0,
             size_jitter: float = 0.08) -> "Blob":
        n = 5
        w = rng.normal(size=(n, 3))
        w *= (rng.uniform(1.2, 3.0, size=n) / np.linalg.norm(w, axis=1))[:, None]
        return cls(center=np.asarray(center, float) + rng.normal(0, jitter_mm, 3),
                   radii=np.asarray(radii, float) * rng.uniform(1 - size_jitter, 1 + size_jitter, 3),
                   rotation=np.eye(3) if rotation is None else np.asarray(rotation, float),
                   w=w, amp=rng.uniform(0.3, 1.0, n) * roughness, phase=rng.uniform(0, 2 * np.pi, n))

    def bounds(self, margin: float = 1.35) -> Tuple[Array, Array]:
        """A world box (LPS mm) that contains the blob."""
        r = float(self.radii.max()) * (1.0 + self.amp.sum()) * margin
        return self.center - r, self.center + r

    def level(self, x: Array, y: Array, z: Array) -> Array:
        """``|u| / (1 + perturbation)``: < 1 inside; also usable for inner shells (e.g. < 0.6)."""
        d = [x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2])]
        rt = self.rotation.T.astype(np.float32)
        u = [(rt[r, 0] * d[0] + rt[r, 1] * d[1] + rt[r, 2] * d[2]) / np.float32(self.radii[r]) for r in range(3)]
        pert = np.ones_like(u[0])
        for (wx, wy, wz), a, ph in zip(self.w.astype(np.float32), self.amp.astype(np.float32),
                                      self.phase.astype(np.float32)):
            pert += a * np.sin(wx * u[0] + wy * u[1] + wz * u[2] + ph)
        return np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) / pert


# ------------------------------------------------------------------------------------------------- phantom
@dataclass
class Phantom:
    """Anatomy parameters of one case (all lengths LPS mm)."""

    a: float  # body half-width (left-right)
    b: float  # body half-depth (antero-posterior), anterior side
    d0: float  # base height of the diaphragm
    fat: float  # subcutaneous fat thickness (anterior is thicker)
    muscle: float  # abdominal wall muscle thickness
    phase: str  # "non-contrast" or "portal-venous"
    hu: Dict[str, float]
    body_harm: Array  # (3, 2) amplitude/phase of the angular harmonics m = 2, 3, 4 of the outline
    spine_y0: float
    vert_period: float
    vert_z0: float
    rib_period: float
    organs: Dict[str, Blob] = field(default_factory=dict)
    fields: Dict[str, Field] = field(default_factory=dict)


def draw_phantom(rng: np.random.Generator) -> Phantom:
    """Draw the anatomy of one case: sizes, positions, contrast phase, tissue HU and shape noise."""
    s = rng.uniform(0.9, 1.08)
    a = 160.0 * s * rng.uniform(0.95, 1.05)
    b = 112.0 * s * rng.uniform(0.95, 1.05)
    d0 = float(rng.uniform(-10, 10))
    phase = "portal-venous" if rng.random() < 0.6 else "non-contrast"
    pv = phase == "portal-venous"
    base = {  # HU means; contrast-enhanced values from typical portal-venous CT
        "skin": 30, "fat": -100, "muscle": 60 if pv else 50, "liver": 105 if pv else 58,
        "spleen": 115 if pv else 48, "kidney_cortex": 175 if pv else 33, "kidney_medulla": 135 if pv else 30,
        "aorta": 170 if pv else 42, "ivc": 130 if pv else 40, "heart": 150 if pv else 42, "bowel": 60 if pv else 35,
        "lung": -855, "bone_cortical": 900, "bone_cancellous": 260, "rib": 550, "disc": 90, "csf": 15,
        "fluid": 10, "air": -1000, "gas": -950,
    }
    hu = {k: float(v + (rng.normal(0, 6) if v > -500 and k not in ("fat",) else rng.normal(0, 10)))
          for k, v in base.items()}
    ph = Phantom(a=a, b=b, d0=d0, fat=float(rng.uniform(8, 30)), muscle=float(rng.uniform(8, 14)), phase=phase,
                 hu=hu, body_harm=np.stack([rng.uniform(0, 0.035, 3), rng.uniform(0, 2 * np.pi, 3)], 1),
                 spine_y0=0.45 * b, vert_period=float(rng.uniform(27, 32)), vert_z0=float(rng.uniform(0, 30)),
                 rib_period=float(rng.uniform(27, 33)))
    rz = lambda deg: _rotation("z", deg + rng.normal(0, 5))  # noqa: E731 (small helper)
    ry = lambda deg: _rotation("y", deg + rng.normal(0, 4))  # noqa: E731
    o = ph.organs
    o["liver"] = Blob.draw(rng, (-55 * s, -8 * s, d0 - 45), (82 * s, 85 * s, 72 * s), rz(-10))
    o["liver_left"] = Blob.draw(rng, (22 * s, -55 * s, d0 - 22), (55 * s, 30 * s, 36 * s), rz(15))
    o["gallbladder"] = Blob.draw(rng, (-45 * s, -55 * s, d0 - 95), (16, 14, 30), rz(20), roughness=0.03)
    o["spleen"] = Blob.draw(rng, (82 * s, 48 * s, d0 - 42), (26 * s, 55 * s, 50 * s), rz(-35))
    o["stomach"] = Blob.draw(rng, (45 * s, -28 * s, d0 - 38), (45 * s, 32 * s, 42 * s), rz(-25))
    o["heart"] = Blob.draw(rng, (22 * s, -30 * s, d0 + 75), (58 * s, 44 * s, 52 * s), rz(30), roughness=0.03)
    for side, sign, dz in (("kidney_right", -1, -120), ("kidney_left", 1, -105)):
        rot = rz(sign * 30) @ ry(sign * 15)
        o[side] = Blob.draw(rng, (sign * 62 * s, 50 * s, d0 + dz), (27 * s, 23 * s, 55 * s), rot, roughness=0.04)
        c = o[side].center
        # renal hilum/sinus: a sphere on the anteromedial side of the kidney
        o[side + "_hilum"] = Blob.draw(rng, (c[0] - sign * 20 * s, c[1] - 8 * s, c[2]), (14, 14, 22), rot,
                                       roughness=0.0, jitter_mm=1.0, size_jitter=0.05)
    ph.fields = {
        "texture": Field.draw(rng, (18, 45), 8),  # organ parenchyma inhomogeneity
        "bowel": Field.draw(rng, (45, 90), 8),  # bowel loops vs mesenteric fat
        "gas": Field.draw(rng, (12, 30), 8),  # gas pockets inside bowel
        "vessels": Field.draw(rng, (10, 22), 10),  # lung vessels / liver vessels
        "spine": Field.draw(rng, (200, 400), 2),  # spinal curvature
    }
    return ph


def _diaphragm(ph: Phantom, x: Array, y: Array) -> Array:
    """Height (z, mm) of the diaphragm surface: a higher right dome, lower posterior recesses."""
    g = lambda cx, sig: np.exp(-((x - cx) ** 2 + (y + 5) ** 2) / np.float32(2 * sig * sig))  # noqa: E731
    post = np.clip((y + 20) / np.float32(ph.b), 0, 1)
    return np.float32(ph.d0) + 40 * g(-70, 65) + 28 * g(70, 60) - 45 * post


def render(ph: Phantom, grid: Grid) -> Tuple[Array, Array]:
    """Hard-edged HU volume (float32) and label map (uint8) of ``ph`` sampled on ``grid`` (array axes i,j,k)."""
    hu = np.full(grid.shape, ph.hu["air"], np.float32)
    lab = np.zeros(grid.shape, np.uint8)
    X, Y, Z = grid.world()
    H = ph.hu
    tex = ph.fields["texture"](X, Y, Z)

    # CT table below the patient (posterior = +y): two thin carbon shells around a foam core
    yt = np.float32(ph.b * 0.92 + 12) + 0.0006 * X ** 2
    t = Y - yt
    hu[(t > 0) & (t < 14)] = H.get("table_foam", -850)
    hu[((t > 0) & (t < 2)) | ((t > 12) & (t < 14))] = H.get("table_shell", 250)

    # body outline: super-ellipse with angular harmonics, flatter posteriorly
    R = np.sqrt(X ** 2 + Y ** 2)
    theta = np.arctan2(Y, X)
    by = np.where(Y > 0, np.float32(ph.b * 0.92), np.float32(ph.b))
    rho = (np.abs(X / np.float32(ph.a)) ** 2.4 + np.abs(Y / by) ** 2.4) ** (1 / 2.4)
    harm = np.ones_like(R)
    for m, (amp, phi) in zip((2, 3, 4), ph.body_harm):
        harm += np.float32(amp) * np.cos(m * theta + np.float32(phi))
    depth = R / np.maximum(rho / harm, 1e-3) - R  # mm from the skin, measured along the ray from the axis
    fat_t = np.float32(ph.fat) * (1 + 0.4 * np.clip(-np.sin(theta), -0.5, 1))  # thicker anteriorly
    cav = depth - fat_t - np.float32(ph.muscle)  # depth inside the body cavity (mm), < 0 in the wall
    body = depth > 0
    hu[body] = H["skin"]
    m = body & (depth > 2)
    hu[m] = H["fat"] + 8 * tex[m]
    m = cav > -ph.muscle
    hu[m] = H["muscle"] + 4 * tex[m]

    zd = _diaphragm(ph, X, Y)
    thorax = (Z > zd) & (cav > 0)
    abdomen = (Z <= zd) & (cav > 0)
    # thorax default: mediastinal fat; abdomen: bowel loops / mesenteric fat / gas
    hu[thorax] = H["fat"] + 10 * tex[thorax]
    bf = ph.fields["bowel"](X, Y, Z)
    bowel = abdomen & (bf > -0.1)
    hu[abdomen] = H["fat"] + 10 * tex[abdomen]
    hu[bowel] = H["bowel"] + 8 * tex[bowel]
    gas = bowel & (bf > 0.3) & (ph.fields["gas"](X, Y, Z) > 1.5)
    hu[gas] = H["gas"]

    # spine geometry (needed by several structures)
    ys = np.float32(ph.spine_y0) + 8 * ph.fields["spine"](np.float32(0), np.float32(0), Z)
    vrx = 19 + 0.02 * np.clip(ph.d0 + 60 - Z, 0, 200)  # lumbar bodies are wider
    vry = 0.78 * vrx
    yc = ys + vry + 10  # spinal canal centre

    # ribs (and sternum) in a shell just inside the muscle wall of the lower thorax / upper abdomen
    q = Z - 0.45 * Y
    shell = (cav > 1) & (cav < 9)
    ribs = shell & (np.cos(2 * np.pi * q / np.float32(ph.rib_period)) > 0.55) & (q > ph.d0 - 80)
    ribs &= ~((np.abs(X) < 35) & (Y < -20)) | (Z > ph.d0 + 15)
    hu[ribs] = H["rib"] + 60 * tex[ribs]
    sternum = shell & (np.abs(X) < 16) & (Y < 0) & (Z > ph.d0 + 15)
    hu[sternum] = H["bone_cancellous"] + 80

    # heart and lungs (above the diaphragm, inside the rib cage, outside the mediastinum and spine)
    inner = cav > 10
    heart_blob = ph.organs["heart"]
    heart = heart_blob.level(X, Y, Z) < 1
    heart &= (Z > zd + 2) & inner
    hu[heart] = H["heart"] + 6 * tex[heart]
    # mediastinum: a midline band (anterior junction to the spine) plus the heart and a rounded paravertebral
    # region; rounded so the lungs get smooth medial borders
    paraspine = (X / (vrx + 24)) ** 2 + ((Y - ys - 12) / (vry + 38)) ** 2 < 1
    medias = (((X - 8) / 24) ** 2 + (Y / (0.9 * ph.b)) ** 4 < 1) | heart | paraspine
    lung = inner & (Z > zd + 4) & ~medias
    hu[lung] = H["lung"] + 25 * tex[lung]
    vessel = lung & (ph.fields["vessels"](X, Y, Z) > 1.55)
    hu[vessel] = H.get("lung_vessel", -60)
    lab[lung & (X < 8)] = 5
    lab[lung & (X >= 8)] = 6

    below = inner & (Z < zd - 4)

    def paint(name: str, value: float, label: int = 0, where: Optional[Array] = None,
              keep_labels: bool = False, shell_level: Optional[Tuple[float, float]] = None) -> None:
        """Paint an organ blob inside its bounding box (``where`` is a full-grid mask to intersect with)."""
        blob = ph.organs[name]
        box = grid.box(*blob.bounds())
        if box is None:
            return
        x, y, z = X[box], Y[box], Z[box]
        lv = blob.level(x, y, z)
        m = lv < 1 if shell_level is None else (lv >= shell_level[0]) & (lv < shell_level[1])
        if where is not None:
            m &= where[box]
        if keep_labels:
            m &= lab[box] == 0
        sub = hu[box]
        sub[m] = value + 6 * tex[box][m]
        if label or not keep_labels:
            lab[box][m] = label

    # abdominal organs; later paint wins
    paint("stomach", H["fluid"], 0, below)
    stomach_box = grid.box(*ph.organs["stomach"].bounds())
    if stomach_box is not None:  # supine patient: gas rises to the anterior (-y) part of the stomach
        st = ph.organs["stomach"]
        x, y, z = X[stomach_box], Y[stomach_box], Z[stomach_box]
        cap = (st.level(x, y, z) < 0.92) & (y < st.center[1] - 0.4 * st.radii[1]) & below[stomach_box]
        hu[stomach_box][cap] = H["gas"]
    # the inferior liver edge rises towards the left, which gives the right lobe its wedge shape
    liver_where = below & ~paraspine & (Z > np.float32(ph.d0 - 135) + 0.6 * (X + 60))
    paint("liver", H["liver"], 1, liver_where)
    paint("liver_left", H["liver"], 1, liver_where)
    lv_box = grid.box(*ph.organs["liver"].bounds())
    if lv_box is not None:  # hepatic/portal vessels inside the liver (still liver label, as in manual labels)
        lm = lab[lv_box] == 1
        vm = lm & (ph.fields["vessels"](X[lv_box], Y[lv_box], Z[lv_box]) > 1.6)
        hu[lv_box][vm] = H["ivc"] + 10 if ph.phase == "portal-venous" else H["liver"] - 15
    paint("gallbladder", H["fluid"], 0, below)
    paint("spleen", H["spleen"], 2, below)
    for side, value in (("kidney_right", 3), ("kidney_left", 4)):
        paint(side, H["fat"], 0, below, keep_labels=True, shell_level=(1.0, 1.45))  # perirenal fat
        paint(side, H["kidney_cortex"], value, below)
        paint(side, H["kidney_medulla"], value, below, shell_level=(0.0, 0.62))
        paint(side + "_hilum", H["fat"], 0, below & (lab == value))  # renal sinus fat

    # muscles beside the spine (psoas grows caudally), then the great vessels
    psoas_r = np.clip((ph.d0 - 80 - Z) * 0.22, 0, 26)
    for sgn in (-1, 1):
        psoas = inner & ((X - sgn * (vrx + psoas_r + 2)) ** 2 + (Y - ys) ** 2 < psoas_r ** 2)
        hu[psoas] = H["muscle"] + 4 * tex[psoas]
        lab[psoas] = 0
        para = body & (((X - sgn * 30) / 24) ** 2 + ((Y - yc - 22) / 20) ** 2 < 1) & (cav < 40)
        hu[para] = H["muscle"] + 4 * tex[para]
        lab[para] = 0
    t = np.clip((ph.d0 + 20 - Z) / 50, 0, 1)  # descending thoracic aorta -> abdominal aorta
    ax = 22 * (1 - t) + 8 * t
    ay = (ys - 8) * (1 - t) + (ys - vry - 14) * t
    bif = ph.d0 - 175
    ar = np.float32(12 * (ph.a / 160))
    aorta = ((X - ax) ** 2 + (Y - ay) ** 2 < ar ** 2) & (Z > bif)
    spread = np.clip(bif - Z, 0, None) * 0.45  # common iliac arteries below the bifurcation (unlabelled)
    iliac = (((np.abs(X - 8) - spread) ** 2 + (Y - ay) ** 2) < (0.65 * ar) ** 2) & (Z <= bif)
    ivc = (((X + 24) / 13) ** 2 + ((Y - ys + vry + 10) / 10) ** 2 < 1) & (Z < ph.d0 + 15) & body
    hu[ivc] = H["ivc"]
    lab[ivc] = 0
    hu[aorta | iliac] = H["aorta"]
    lab[iliac] = 0
    lab[aorta] = 8

    # vertebrae: bodies with cortical shell and discs, arch, spinous and transverse processes
    zz = np.mod(Z - np.float32(ph.vert_z0), np.float32(ph.vert_period))
    disc = zz < 7
    r_body = np.sqrt((X / vrx) ** 2 + ((Y - ys) / vry) ** 2)
    vbody = r_body < 1
    cortical = vbody & ((r_body > 0.84) | (zz < 9) | (zz > ph.vert_period - 2))
    rc = np.sqrt(X ** 2 + (Y - yc) ** 2)
    canal = rc < 9
    za = np.mod(Z - np.float32(ph.vert_z0) + 0.35 * (Y - yc), np.float32(ph.vert_period))
    arch_seg = za > 0.3 * ph.vert_period
    arch = ((rc >= 9) & (rc < 15) & (Y > yc - 5)) | ((np.abs(X) > 6) & (np.abs(X) < 15) & (Y > ys) & (Y < yc))
    spinous = (np.abs(X) < 4) & (Y > yc + 12) & (Y < yc + 42)
    transverse = (np.abs(X) > 14) & (np.abs(X) < 42) & (np.abs(Y - yc) < 5)
    tp_seg = (za > 0.45 * ph.vert_period) & (za < 0.75 * ph.vert_period)  # processes are thinner than arches
    posterior = ((arch | spinous) & arch_seg | transverse & tp_seg) & body
    bone_body = vbody & ~disc
    hu[vbody & disc] = H["disc"]
    lab[vbody & disc] = 0
    hu[bone_body] = H["bone_cancellous"] + 40 * tex[bone_body]
    hu[bone_body & cortical] = H["bone_cortical"]
    hu[posterior] = 0.5 * (H["bone_cortical"] + H["bone_cancellous"]) + 60 * tex[posterior]
    hu[canal & body] = H["csf"]
    lab[canal & body] = 0
    lab[bone_body | posterior] = 7
    return hu, lab


def acquire(hu: Array, grid: Grid, rng: np.random.Generator) -> Array:
    """Scanner model: partial-volume blur, correlated noise, circular recon FOV -> int16 HU.

    The blur is anisotropic in voxels (array axis 2 is the thick slice axis); noise is correlated in-plane
    like filtered back-projection noise, with a per-case standard deviation of 8-18 HU.
    """
    img = ndimage.gaussian_filter(hu, sigma=(0.6, 0.6, 0.45), mode="nearest")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.7, 0.7, 0.0), mode="wrap")
    noise *= np.float32(rng.uniform(8, 18)) / max(float(noise.std()), 1e-6)
    img += noise
    n0, n1 = grid.shape[:2]
    i = np.arange(n0)[:, None] - (n0 - 1) / 2
    j = np.arange(n1)[None, :] - (n1 - 1) / 2
    outside = (i ** 2 + j ** 2) > (min(n0, n1) / 2) ** 2
    img[outside] = -1024
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


#: MR-like signal of each tissue (arbitrary units, 0 = no signal), T1- and T2-weighted, for ``--modality mr``:
#: fat and marrow bright on both, fluid dark on T1 and bright on T2, spleen darker than liver on T1 and
#: brighter on T2, cortical bone, lung and air dark, flowing blood dark (flow void) unless contrast-enhanced.
MR_SIGNAL: Dict[str, Dict[str, float]] = {
    "T1": {"skin": 500, "fat": 900, "muscle": 300, "liver": 460, "spleen": 330, "kidney_cortex": 400,
           "kidney_medulla": 260, "aorta": 90, "ivc": 110, "heart": 260, "bowel": 300, "lung": 30,
           "bone_cortical": 25, "bone_cancellous": 650, "rib": 450, "disc": 260, "csf": 120, "fluid": 100,
           "air": 5, "gas": 5, "table_foam": 5, "table_shell": 5, "lung_vessel": 60},
    "T2": {"skin": 320, "fat": 620, "muscle": 150, "liver": 210, "spleen": 430, "kidney_cortex": 450,
           "kidney_medulla": 560, "aorta": 40, "ivc": 60, "heart": 110, "bowel": 350, "lung": 20,
           "bone_cortical": 15, "bone_cancellous": 420, "rib": 260, "disc": 520, "csf": 1200, "fluid": 1100,
           "air": 5, "gas": 5, "table_foam": 5, "table_shell": 5, "lung_vessel": 40},
}
MODALITIES: Tuple[str, ...] = ("ct", "mr")


def mr_signal(rng: np.random.Generator, weighting: str, ct_phase: str) -> Dict[str, float]:
    """Each tissue's signal for ``weighting`` (``"T1"`` or ``"T2"``), +-15 % per tissue and case.

    A contrast-enhanced (``portal-venous``) phantom gets bright vessels and a brighter spleen/kidney cortex on
    T1, as after gadolinium.
    """
    signal = dict(MR_SIGNAL[weighting])
    if weighting == "T1" and ct_phase == "portal-venous":
        signal.update(aorta=750, ivc=650, heart=600, spleen=560, kidney_cortex=700, kidney_medulla=520, liver=560,
                      lung_vessel=200)
    scale = float(rng.uniform(0.7, 1.4))  # scanners differ in overall gain
    return {k: float(v * scale * rng.uniform(0.85, 1.15)) for k, v in signal.items()}


def acquire_mr(signal: Array, grid: Grid, rng: np.random.Generator) -> Array:
    """MR scanner model: partial-volume blur, a smooth multiplicative bias field (coil sensitivity), Rician
    noise (magnitude of complex Gaussian noise, 1.5-4 % of the mean tissue signal) -> int16 >= 0."""
    img = ndimage.gaussian_filter(signal, sigma=(0.6, 0.6, 0.45), mode="nearest")
    n0, n1, n2 = grid.shape
    axes = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in (n0, n1, n2)), indexing="ij")
    bias = np.zeros(grid.shape, np.float32)
    for axis in axes:
        bias += np.float32(rng.uniform(-0.25, 0.25)) * axis
    bias += np.float32(rng.uniform(-0.2, 0.2)) * axes[0] * axes[1]
    img *= np.exp(bias)
    sigma = np.float32(rng.uniform(0.015, 0.04) * float(img[img > 50].mean() if (img > 50).any() else 100.0))
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt(real * real + imag * imag)
    return np.clip(np.rint(img), 0, 32767).astype(np.int16)


@dataclass
class Case:
    """One synthetic case: ``image`` int16 HU and ``label`` uint8, both (I, J, K) with NIfTI ``affine`` (RAS)."""

    name: str
    image: Array
    label: Array
    affine: Array
    meta: Dict[str, object]


def generate_case(seed: int, index: int, in_plane: int = 256, orientation: Optional[str] = None,
                  modality: str = "ct") -> Case:
    """Generate case ``index`` of the sample set drawn from ``seed`` (deterministic, independent of other cases).

    ``orientation`` defaults to ``ORIENTATIONS[index % 4]``; ``in_plane`` is the pixel count per in-plane axis.
    ``modality`` ``"mr"`` renders the same anatomy with MR-like tissue signal (:func:`mr_signal`; T1-weighted for
    even, T2-weighted for odd ``index``) and
    :func:`acquire_mr`; the CT cases of a seed are the same whether or not MR cases are made.
    """
    if index < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    rng = np.random.default_rng([int(seed), int(index)])
    ph = draw_phantom(rng)
    orientation = orientation or ORIENTATIONS[index % len(ORIENTATIONS)]
    grid = make_grid(rng, orientation, in_plane, 2 * ph.a, center_xy=(rng.normal(0, 5), rng.normal(5, 5)),
                     z_top=ph.d0 + rng.uniform(80, 120))
    weighting = None
    if modality == "mr":
        mr_rng = np.random.default_rng([int(seed), int(index), 1])  # its own stream: the anatomy stays the CT's
        weighting = ("T1", "T2")[index % 2]
        ph.hu = mr_signal(mr_rng, weighting, ph.phase)
    hu, lab = render(ph, grid)
    image = acquire(hu, grid, rng) if modality == "ct" else acquire_mr(hu, grid, mr_rng)
    counts = np.bincount(lab.ravel(), minlength=len(LABELS))
    name = f"synth_{modality}_{index:03d}"
    meta = {
        "shape": list(grid.shape), "spacing": [round(float(s), 4) for s in grid.spacing],
        "orientation": orientation, "axcodes": "".join(nib.aff2axcodes(grid.affine_ras)),
        "direction_lps": np.round(grid.direction, 6).tolist(), "contrast_phase": ph.phase,
        "label_voxels": {LABELS[v]: int(c) for v, c in enumerate(counts) if v},
    }
    if weighting:
        meta["mr_weighting"] = weighting
    return Case(name=name, image=image, label=lab, affine=grid.affine_ras, meta=meta)


def _nifti(array: Array, affine: Array) -> nib.Nifti1Image:
    """NIfTI image with qform = sform = ``affine`` (scanner coordinates, mm units)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def write_dataset(output: Path, num_cases: int = 4, seed: int = 0, layout: str = "studies",
                  in_plane: int = 256, unlabeled: int = 0, verbose: bool = False,
                  modality: str = "ct") -> Dict[str, object]:
    """Write ``num_cases`` cases and ``dataset.json`` under ``output``; returns the dataset.json dict.

    ``unlabeled`` (studies layout only): the last ``unlabeled`` cases get their label written to
    ``output/ground_truth/`` rather than ``output/labels/final/``.
    """
    if layout not in ("studies", "training"):
        raise ValueError(f"layout must be 'studies' or 'training', got {layout!r}")
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if not 0 <= unlabeled <= num_cases:
        raise ValueError(f"unlabeled must be between 0 and num_cases={num_cases}, got {unlabeled}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if unlabeled and layout != "studies":
        raise ValueError("unlabeled only applies to the studies layout (training data needs every label)")
    output = Path(output)
    img_dir, lab_dir = ((output, output / "labels" / "final") if layout == "studies"
                        else (output / "imagesTr", output / "labelsTr"))
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    training: List[Dict[str, object]] = []
    for index in range(num_cases):
        t0 = time.perf_counter()
        case = generate_case(seed, index, in_plane=in_plane, modality=modality)
        fname = case.name + ".nii.gz"
        case_lab_dir = lab_dir if index < num_cases - unlabeled else output / "ground_truth"
        case_lab_dir.mkdir(parents=True, exist_ok=True)
        nib.save(_nifti(case.image, case.affine), img_dir / fname)
        nib.save(_nifti(case.label, case.affine), case_lab_dir / fname)
        training.append({"image": f"./{(img_dir / fname).relative_to(output).as_posix()}",
                         "label": f"./{(case_lab_dir / fname).relative_to(output).as_posix()}", **case.meta})
        if verbose:
            print(f"{case.name}: {case.meta['shape']} {case.meta['axcodes']} ({case.meta['orientation']}, "
                  f"{case.meta.get('mr_weighting', case.meta['contrast_phase'])}) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
    kind = "CT" if modality == "ct" else "MR"
    info: Dict[str, object] = {
        "name": f"sam_med3d_synthetic_torso_{modality}",
        "description": f"Synthetic {kind}-like torso phantoms (lower thorax + abdomen) with organ labels, generated "
                       "offline by sam_med3d.phantoms (sample-datasets/make_samples.py). Not real patients; for first "
                       "runs, tests and rehearsal.",
        "modality": {"0": kind},
        "labels": {str(k): v for k, v in LABELS.items()},
        "license": "CC0-1.0 (synthetic data generated by this repository's sam_med3d.phantoms)",
        "label_origin": "exact: labels are the phantom's own masks",
        "tensorImageSize": "3D",
        "seed": seed,
        "layout": layout,
        "numTraining": num_cases,
        "training": training,
    }
    (output / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
