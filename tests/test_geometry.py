"""Canonical 1.5 mm grid, crops around clicks, normalisation and paste-back (sam_med3d.geometry)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import distance_transform_edt

from conftest import data_cases
from sam_med3d.geometry import PreparedScan, normalize_intensity, sample_separable
from sam_med3d.io import LPS_TO_RAS, Scan, load_scan

SPACING = np.array([0.8, 1.3, 2.5])


def _rotation(deg: float) -> np.ndarray:
    a, b = np.deg2rad(deg), np.deg2rad(deg / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


#: Direction matrices (columns = RAS direction of array axes i, j, k) for the orientations in the data set.
ORIENTATIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "PSR": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    "oblique": np.diag([-1.0, -1.0, 1.0]) @ _rotation(20.0),
}


def _affine(direction: np.ndarray, spacing=SPACING, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = direction @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


def _linear_scan(direction: np.ndarray, shape=(40, 30, 16)) -> Scan:
    """Intensity = a linear function of the RAS position (trilinear sampling reproduces it exactly)."""
    affine = _affine(direction)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = _world(affine, ijk)
    values = 100.0 + world @ np.array([1.0, -2.0, 3.0])
    return load_scan(values.reshape(shape).astype(np.float32), affine)


def _itk_resample(scan: Scan, crop) -> np.ndarray:
    """The crop grid filled by SimpleITK's linear resampler (default value 0): the reference implementation."""
    img = sitk.GetImageFromArray(scan.array.transpose(2, 1, 0))
    lps = LPS_TO_RAS @ scan.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    grid = LPS_TO_RAS @ crop.affine
    grid_spacing = np.linalg.norm(grid[:3, :3], axis=0)
    ref = sitk.Image([crop.size] * 3, sitk.sitkFloat32)
    ref.SetSpacing(grid_spacing.tolist())
    ref.SetOrigin(grid[:3, 3].tolist())
    ref.SetDirection((grid[:3, :3] / grid_spacing).flatten().tolist())
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_canonical_grid_is_ras_ordered_1p5mm_and_keeps_the_field_of_view(name):
    scan = _linear_scan(ORIENTATIONS[name])
    prep = PreparedScan(scan)
    assert "".join(nib.aff2axcodes(prep.affine)) == "RAS"
    np.testing.assert_allclose(np.linalg.norm(prep.affine[:3, :3], axis=0), 1.5)
    # torchio's grid: ceil(n * spacing / 1.5) voxels along the scan's own (permuted) axes ...
    expected = [math.ceil(scan.shape[p] * SPACING[p] / 1.5) for p in prep.source_axis]
    assert prep.shape == tuple(expected)
    # ... anchored at the corner of STORED voxel 0 (the official order: resample in the stored orientation,
    # then reorient), which is the far end of every axis that the reorientation reverses.
    flipped = prep.step < 0
    canon_corner = np.where(flipped, np.asarray(prep.shape) - 0.5, -0.5)[None]
    np.testing.assert_allclose(prep.to_original(canon_corner), -0.5, atol=1e-9)
    # The canonical grid's axes are the scan's axes: no rotation, even for the oblique scan.
    for a in range(3):
        col = prep.affine[:3, a] / 1.5
        src = scan.affine[:3, prep.source_axis[a]] / SPACING[prep.source_axis[a]]
        np.testing.assert_allclose(np.abs(col @ src), 1.0)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_maps_agree_with_world_positions(name):
    scan = _linear_scan(ORIENTATIONS[name])
    prep = PreparedScan(scan)
    pts = np.array([[0, 0, 0], [39, 29, 15], [12.0, 7.5, 3.25]])
    canon = prep.to_canonical(pts)
    np.testing.assert_allclose(_world(prep.affine, canon), _world(scan.affine, pts), atol=1e-9)
    np.testing.assert_allclose(prep.to_original(canon), pts, atol=1e-9)
    crop = prep.crop_around(pts[:1], 16)
    np.testing.assert_allclose(_world(crop.affine, crop.to_crop(pts)), _world(scan.affine, pts), atol=1e-9)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_crop_pixels_match_itk_resampling(name):
    """Separable sampling == SimpleITK linear resampling on the same grid, padding and edges included."""
    rng = np.random.default_rng(1)
    scan = load_scan(rng.normal(50, 20, (40, 30, 16)).astype(np.float32), _affine(ORIENTATIONS[name]))
    prep = PreparedScan(scan)
    crop = prep.crop_around([[20, 15, 8]], 32)  # larger than the scan along every axis: pads everywhere
    assert not bool(crop.inside.all())
    np.testing.assert_allclose(crop.raw.numpy(), _itk_resample(scan, crop), atol=1e-4)
    assert float(crop.raw[~crop.inside].abs().max()) == 0.0


def test_crop_pixels_match_itk_on_real_scans(data_dir):
    """One LAS CT and the oblique prostate MRI: our crop equals ITK's resampling of the real file."""
    for dataset in ("msd_spleen_ct", "picai_prostate_t2w_lesion"):
        image = next((data_dir / dataset / "imagesTr").glob("*.nii.gz"))
        prep = PreparedScan.load(image)
        centre = np.array(prep.scan.shape) // 2
        crop = prep.crop_around([centre], 64)
        ref = _itk_resample(prep.scan, crop)
        ours = crop.raw.numpy()
        assert prep.scan.integer  # int16 CT, uint16 MRI: the official resampling truncates toward zero
        np.testing.assert_allclose(ours, ref, atol=1.0 + 1e-3)
        # Truncation, not rounding: ours is the float interpolant truncated, except on knife-edge voxels (an
        # interpolant that is an integer up to floating-point noise), which are many on the oblique MRI.
        assert np.mean(ours == np.trunc(ref)) > (0.98 if dataset == "msd_spleen_ct" else 0.9), dataset


def test_single_click_sits_at_the_crop_centre_and_the_crop_pads_at_the_border():
    scan = _linear_scan(ORIENTATIONS["LPS"], shape=(200, 150, 80))  # canonical 107 x 130 x 134
    prep = PreparedScan(scan)
    click = np.array([[100, 75, 40]])
    crop = prep.crop_around(click, 32)
    np.testing.assert_allclose(crop.to_crop(click)[0], [16, 16, 16], atol=0.5)
    assert bool(crop.contains(click)[0])
    # Near the border the crop stays centred on the click and pads (CropOrPad), it is not clamped inside.
    corner = prep.crop_around([[0, 0, 0]], 32)
    np.testing.assert_allclose(corner.to_crop([[0, 0, 0]])[0], [16, 16, 16], atol=0.5)
    assert not bool(corner.inside.all())
    assert float(corner.raw[~corner.inside].abs().max()) == 0.0
    assert not bool(corner.contains(click)[0])


def test_crop_centres_on_positive_clicks_only():
    prep = PreparedScan(_linear_scan(ORIENTATIONS["RAS"], shape=(200, 150, 80)))
    clicks = np.array([[60, 60, 40], [80, 60, 40], [190, 140, 70]])
    labels = np.array([1, 1, 0])
    crop = prep.crop_around(clicks, 32, labels)
    np.testing.assert_allclose(crop.to_crop([[70, 60, 40]])[0], [16, 16, 16], atol=0.5)
    assert crop.contains(clicks).tolist() == [True, True, False]
    negative_only = prep.crop_around(clicks[2:], 32, labels[2:])
    assert bool(negative_only.contains(clicks[2:])[0])


def test_crop_start_is_cropor_pad_rule_on_the_clicks_bounding_box():
    """start = floor((lo + hi) / 2) - size // 2 over the canonical voxels of the positive clicks, also on axes
    shorter than the crop (the object, not the scan, is centred)."""
    prep = PreparedScan(_linear_scan(ORIENTATIONS["LAS"], shape=(40, 30, 16)))  # canonical 22 x 20 x 27
    clicks = np.array([[3, 4, 5], [9, 4, 12], [30, 20, 2]])
    crop = prep.crop_around(clicks, 64, [1, 1, 0])
    voxels = np.floor(prep.to_canonical(clicks[:2]) + 0.5).astype(int)
    expected = (voxels.min(0) + voxels.max(0) + 1) // 2 - 32
    assert crop.start == tuple(int(v) for v in expected)
    mask = np.zeros(prep.scan.shape, np.uint8)
    mask[3:10, 4, 5:13] = 1
    assert prep.crop_box_of_mask(mask, 64) == crop.start


def test_crop_from_affine_accepts_only_whole_voxel_shifts_of_the_grid():
    prep = PreparedScan(_linear_scan(ORIENTATIONS["oblique"]))
    crop = prep.crop((-3, 5, 7), 16)
    assert prep.crop_from_affine(crop.affine, 16).key == crop.key
    shifted = crop.affine.copy()
    shifted[:3, 3] += 0.3 * crop.affine[:3, 0]
    with pytest.raises(ValueError, match="whole-voxel shift"):
        prep.crop_from_affine(shifted, 16)
    with pytest.raises(ValueError, match="4x4"):
        prep.crop_from_affine(np.eye(3), 16)
    # The affine as it comes back from a client (float32, a JSON round trip, a tensor): rounding noise within
    # 1e-4 of a voxel per matrix entry and 1e-3 of a voxel in the shift is the same crop; a crop of twice the
    # voxel size, or a shift 2e-3 of a voxel off the grid, is not.
    assert prep.crop_from_affine(torch.as_tensor(crop.affine), 16).key == crop.key
    noisy = np.linalg.solve(prep.affine, crop.affine)  # crop index -> canonical index
    noisy[:3, :3] += 5e-5
    noisy[:3, 3] += 5e-4
    assert prep.crop_from_affine(prep.affine @ noisy, 16).key == crop.key
    coarse = np.linalg.solve(prep.affine, crop.affine)
    coarse[:3, :3] *= 2.0
    off = np.linalg.solve(prep.affine, crop.affine)
    off[:3, 3] += 2e-3
    for bad in (coarse, off):
        with pytest.raises(ValueError, match="whole-voxel shift"):
            prep.crop_from_affine(prep.affine @ bad, 16)
    # The message shows the map the affine makes, to 4 decimals.
    ras = PreparedScan(_linear_scan(ORIENTATIONS["RAS"]))
    off_grid = ras.crop((2, 3, 4), 16).affine.copy()
    off_grid[:3, 3] += 0.123456 * ras.spacing_mm
    with pytest.raises(ValueError) as refused:
        ras.crop_from_affine(off_grid, 16)
    assert str(refused.value) == (
        "crop_affine is not a whole-voxel shift of the scan's canonical 1.5 mm grid (canonical index = "
        "[[1.0, 0.0, 0.0, 2.1235], [0.0, 1.0, 0.0, 3.1235], [0.0, 0.0, 1.0, 4.1235], [0.0, 0.0, 0.0, 1.0]] @ crop index): "
        "it cannot be one of this scan's crops")


def test_normalisation_uses_positive_voxels_and_pads_with_zero():
    rng = np.random.default_rng(0)
    ct = rng.normal(-300, 400, (50, 50, 20)).astype(np.float32)  # CT-like: many voxels <= 0
    prep = PreparedScan(load_scan(ct, _affine(np.eye(3), spacing=(1.5, 1.5, 1.5))))
    crop = prep.crop_around([[25, 25, 10]], 64)  # pads
    raw, image = crop.raw, crop.image
    positive = raw > 0
    assert abs(float(image[positive].mean())) < 1e-4
    assert abs(float(image[positive].std()) - 1.0) < 1e-4
    mean, std = crop.mean_std
    # The padding was 0 before normalisation (torchio CropOrPad default), like every other voxel it is shifted.
    np.testing.assert_allclose(image[~crop.inside].numpy(), -mean / std, rtol=1e-5)
    np.testing.assert_allclose(image.numpy(), ((raw.double() - mean) / std).numpy(), atol=1e-4)


def test_normalisation_fallbacks():
    negative = -torch.arange(1000.0).reshape(10, 10, 10)  # no voxel > 0: whole-crop statistics
    image, mean, std = normalize_intensity(negative)
    assert abs(float(image.mean())) < 1e-5 and abs(float(image.std()) - 1) < 1e-4
    flat, mean, std = normalize_intensity(torch.full((4, 4, 4), -5.0))
    assert std == 1.0 and float(flat.abs().max()) == 0.0



def test_normalisation_with_two_positive_voxels_and_with_equal_positive_voxels():
    """Two positive voxels are enough for their own statistics; positive voxels that are all equal (zero std)
    fall back to the whole crop's statistics instead of dividing by zero."""
    two = torch.tensor([-4.0, 1.0, 3.0, -2.0]).reshape(1, 2, 2)
    image, mean, std = normalize_intensity(two)
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2.0))
    np.testing.assert_allclose(image.numpy(), (two.numpy() - 2.0) / math.sqrt(2.0), rtol=1e-6)
    flat_positive = torch.tensor([0.0, 0.0, 5.0, 5.0]).reshape(1, 2, 2)  # e.g. a binary-valued crop
    image, mean, std = normalize_intensity(flat_positive)
    assert mean == 2.5 and std == pytest.approx(math.sqrt(25.0 / 3.0))  # unbiased std of 0, 0, 5, 5
    assert bool(torch.isfinite(image).all())
    image, mean, std = normalize_intensity(torch.tensor([-1.0, -1.5]))  # no positive voxel: both voxels count
    assert mean == -1.25 and std == pytest.approx(math.sqrt(0.125))  # kept although below 1

def _torchio_sitk(array: np.ndarray, affine: np.ndarray, pixel=None) -> sitk.Image:
    """An (i, j, k) array with a RAS affine as torchio 0.19.9 hands it to SimpleITK (``nib_to_sitk``)."""
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0) if pixel is None else array.transpose(2, 1, 0).astype(pixel))
    flip = np.diag([-1.0, -1.0, 1.0])
    spacing = np.sqrt(np.sum(affine[:3, :3] * affine[:3, :3], axis=0))
    image.SetOrigin(tuple(np.dot(flip, affine[:3, 3])))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(np.dot(flip, affine[:3, :3] / spacing).flatten()))
    return image


def _official_paste(values: np.ndarray, crop_affine: np.ndarray, scan: Scan) -> np.ndarray:
    """The official ``data_postprocess``: torchio ``Resample`` (SimpleITK, nearest neighbour, default 0) of the
    crop onto the scan's grid."""
    reference = _torchio_sitk(np.zeros(scan.shape, np.float32), scan.affine)
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetOutputDirection(reference.GetDirection())
    resampler.SetOutputOrigin(reference.GetOrigin())
    resampler.SetOutputSpacing(reference.GetSpacing())
    resampler.SetSize(reference.GetSize())
    out = resampler.Execute(_torchio_sitk(values, crop_affine))
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


#: Spacings whose scan voxels fall exactly halfway between two 1.5 mm crop voxels (1 mm: every third voxel,
#: 3 mm: every voxel), where only ITK's floating-point rounding decides, and one that never ties.
PASTE_SPACINGS = {"1mm": (1.0, 1.0, 1.0), "3mm": (3.0, 3.0, 3.0), "mixed": (1.0, 0.5, 3.0), "no-ties": tuple(SPACING)}


@pytest.mark.parametrize("spacing", sorted(PASTE_SPACINGS))
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_paste_back_is_the_official_simpleitk_resampling(name, spacing):
    """Voxel for voxel what the official paste-back (SimpleITK through torchio) gives, rounding ties included;
    away from ties that is crop voxel floor(c + 0.5), c = inv(A_crop) @ A_scan @ ijk, when c is in the crop."""
    affine = _affine(ORIENTATIONS[name], spacing=PASTE_SPACINGS[spacing], origin=(10.3, -20.1, 5.7))
    scan = load_scan(np.arange(70 * 60 * 30, dtype=np.float32).reshape(70, 60, 30), affine)
    prep = PreparedScan(scan)
    crop = prep.crop_around([[35, 30, 15]], 24)
    values = torch.arange(1, 24 ** 3 + 1, dtype=torch.float32).reshape(24, 24, 24)  # every crop voxel distinct
    pasted = prep.paste_back(crop, values, np.zeros(scan.shape, np.float32))
    official = _official_paste(values.numpy(), crop.itk_affine, scan)
    assert int((pasted != official).sum()) == 0, f"{int((pasted != official).sum())} voxels differ"
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in scan.shape], indexing="ij"), -1).reshape(-1, 3)
    c = _world(np.linalg.inv(crop.affine), _world(scan.affine, ijk))
    tie = np.any(np.abs(c - np.floor(c) - 0.5) < 1e-6, axis=1)
    nearest = np.floor(c + 0.5).astype(int)
    inside = np.all((nearest >= 0) & (nearest < 24), axis=1)
    expected = np.zeros(len(ijk), np.float32)
    expected[inside] = values.numpy()[tuple(nearest[inside].T)]
    assert np.array_equal(pasted.reshape(-1)[~tie], expected[~tie])
    if spacing != "no-ties" and name != "oblique":
        assert tie.mean() > 0.3  # the case is the one it is meant to be
    # region_ijk is exactly the box of scan voxels that were written.
    box = np.zeros(scan.shape, bool)
    box[crop.region_ijk] = True
    assert not pasted[~box].any() and all(pasted[crop.region_ijk].any(axis=a).all() for a in [(1, 2), (0, 2), (0, 1)])
    # A default output is zeros of the values' dtype.
    mask = prep.paste_back(crop, (values > 6000).numpy().astype(np.uint8))
    assert mask.dtype == np.uint8 and mask[~box].max() == 0


@pytest.mark.parametrize("tilt", [0.0, 1e-12])
@pytest.mark.parametrize("values", [(-200, 400), (0, 3)])
@pytest.mark.parametrize("spacing", [1.5, 0.5, 0.75, 0.9, 2.7, 3.0, 7.5])
@pytest.mark.parametrize("name", ["RAS", "LAS", "PSR", "oblique"])
def test_integer_crop_is_the_official_resampling(name, spacing, values, tilt):
    """Integer scans: the crop's raw values are, voxel for voxel, torchio 0.19.9's ``Resample(1.5)`` (SimpleITK,
    the scan's pixel type, truncation) then ``ToCanonical`` and ``CropOrPad``; also where the 1.5 mm sample
    points fall on stored voxel centres (1.5 and 0.5 mm), where ITK's ~1e-16 noise decides the truncation, and
    on scans of three values (0 .. 2), where many interpolants between unequal neighbours land next to an
    integer (weights of thirds at 0.9 and 2.7 mm). ``tilt``: the direction off its axes by 1e-12, the rounding
    noise of many real headers, which makes ITK's positions as unseparable as an oblique scan's; and a truly
    oblique direction."""
    rng = np.random.default_rng(7)
    spacings = (spacing, spacing, 3.0 if spacing < 1 else spacing)
    shape = tuple(int(round(48 / s)) for s in spacings)
    array = rng.integers(*values, size=shape).astype(np.int16)
    direction = ORIENTATIONS[name] @ np.array([[1.0, tilt, 0.0], [-tilt, 1.0, 0.0], [tilt / 3, 0.0, 1.0]])
    direction /= np.linalg.norm(direction, axis=0)
    affine = _affine(direction, spacing=spacings, origin=(10.3, -20.1, 5.7))
    prep = PreparedScan(Scan(array.astype(np.float32), affine, "array", integer=True))
    image = _torchio_sitk(array, affine)
    old_spacing = np.array(image.GetSpacing())
    size = np.ceil(np.array(image.GetSize()) * old_spacing / 1.5).astype(np.uint16)
    reference = sitk.Image(size.tolist(), image.GetPixelID())
    reference.SetDirection(image.GetDirection())
    reference.SetSpacing([1.5] * 3)
    reference.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(0.5 * (1.5 / old_spacing - 1)))
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, image.GetPixelID())
    stored = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    flat_affine = np.eye(4)
    flat_affine[:3, :3] = np.dot(np.diag([-1.0, -1.0, 1.0]), np.array(resampled.GetDirection()).reshape(3, 3)) * 1.5
    canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(stored, flat_affine)).dataobj)
    crop = prep.crop([-3, 2, -1], 24)  # pads on two axes
    expected = np.zeros((24,) * 3, np.float32)
    part = canonical[:21, 2:26, :23]
    expected[3:3 + part.shape[0], :part.shape[1], 1:1 + part.shape[2]] = part
    differing = int((crop.raw.numpy() != expected).sum())
    assert differing == 0, f"{differing} of {24 ** 3} crop voxels differ from SimpleITK's"


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_paste_back_region_is_the_full_paste_back_inside_its_region(name):
    """The crop-local paste-back (what a click costs on a big scan) equals the full-size one exactly: the same
    values in ``region_ijk`` and nothing written outside it, also for a crop that leaves the scan."""
    scan = _linear_scan(ORIENTATIONS[name], shape=(60, 50, 24))
    prep = PreparedScan(scan)
    values = torch.arange(24 ** 3, dtype=torch.float32).reshape(24, 24, 24)
    for click in ([30, 25, 12], [1, 48, 0]):
        crop = prep.crop_around([click], 24)
        full = prep.paste_back(crop, values)
        region, local = prep.paste_back_region(crop, values)
        assert region == crop.region_ijk and local.shape == full[region].shape and local.dtype == np.float32
        np.testing.assert_array_equal(local, full[region])
        outside = np.ones(scan.shape, bool)
        outside[region] = False
        assert not full[outside].any()
    far = prep.crop((500, 500, 500), 24)  # misses the scan
    region, local = prep.paste_back_region(far, values)
    assert region is None and local.size == 0 and not prep.paste_back(far, values).any()


def test_fortran_and_c_ordered_scans_give_the_same_crops():
    """Scans are kept in the memory order they were read in (Fortran for files): crops do not depend on it."""
    for name, integer in (("oblique", False), ("LPS", True)):  # float, and integer (truncated) interpolation
        scan = _linear_scan(ORIENTATIONS[name], shape=(60, 50, 24))
        values = np.round(scan.array * 7.3) if integer else scan.array
        fortran = Scan(np.asfortranarray(values), scan.affine, "f", integer=integer)
        c_order = Scan(np.ascontiguousarray(values), scan.affine, "c", integer=integer)
        assert fortran.array.flags.f_contiguous and not fortran.array.flags.c_contiguous
        a = PreparedScan(fortran).crop_around([[30, 25, 12]], 24)
        b = PreparedScan(c_order).crop_around([[30, 25, 12]], 24)
        assert torch.equal(a.raw, b.raw) and torch.equal(a.image, b.image)
        # The crop-local paste-back comes in the scan's memory order, with the same values.
        values = torch.arange(24 ** 3, dtype=torch.float32).reshape(24, 24, 24)
        (region_f, local_f), (region_c, local_c) = a.prepared.paste_back_region(a, values), \
            b.prepared.paste_back_region(b, values)
        assert region_f == region_c and local_f.flags.f_contiguous and local_c.flags.c_contiguous
        np.testing.assert_array_equal(local_f, local_c)
        np.testing.assert_array_equal(local_f, a.prepared.paste_back(a, values)[region_f])


def test_paste_back_rejects_wrong_inputs():
    prep = PreparedScan(_linear_scan(ORIENTATIONS["RAS"]))
    crop = prep.crop_around([[5, 5, 5]], 16)
    with pytest.raises(ValueError, match=r"shape \(16, 16, 16\)"):
        prep.paste_back(crop, torch.zeros(8, 8, 8))
    other = PreparedScan(_linear_scan(ORIENTATIONS["LPS"]))
    with pytest.raises(ValueError, match="another scan"):
        other.paste_back(crop, torch.zeros(16, 16, 16))


def test_check_inside_names_the_click_and_the_scan():
    prep = PreparedScan(load_scan(np.random.default_rng(0).random((512, 512, 32)).astype(np.float32)))
    with pytest.raises(ValueError, match=r"click \(600, 12, 40\) is outside the scan 512x512x32"):
        prep.check_inside([[1, 2, 3], [600, 12, 40]])
    with pytest.raises(ValueError, match="non-finite"):
        prep.check_inside([[1, np.nan, 3]])
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        prep.check_inside([1, 2, 3])
    np.testing.assert_array_equal(prep.check_inside([[0, 0, 0], [511, 511, 31]]), [[0, 0, 0], [511, 511, 31]])


def test_nearest_sampling_keeps_labels():
    labels = np.zeros((30, 30, 10), np.uint8)
    labels[10:20, 10:20, 3:7] = 4
    out = sample_separable(labels, [np.arange(30.0), np.arange(30.0), np.arange(10.0)], "nearest")
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), labels)
    with pytest.raises(ValueError, match="mode"):
        sample_separable(labels, [np.arange(3.0)] * 3, "cubic")


def test_sampling_at_and_beyond_the_ends_of_each_axis():
    """ITK's rules along every axis: a sample up to half a voxel outside takes the edge voxel's value (-0.5 is
    inside, n - 0.5 outside), farther out it is 0; linear weights by the distance to the two voxel centres,
    nearest rounds ties up; integer scans (truncate) give the same values, truncated toward zero."""
    values = np.array([10, 20, 40, 80])
    coords = np.array([-3.0, -0.51, -0.5, -0.25, 0.0, 0.25, 0.75, 1.5, 2.75, 3.0, 3.25, 3.49, 3.5, 5.0])
    linear = [0, 0, 10, 10, 10, 12.5, 17.5, 30, 70, 80, 80, 80, 0, 0]
    nearest = [0, 0, 10, 10, 10, 10, 20, 40, 80, 80, 80, 80, 0, 0]
    for axis in range(3):
        shape, grid = [1, 1, 1], [np.zeros(1)] * 3
        shape[axis], grid[axis] = 4, coords
        for dtype in (np.float32, np.int16):
            volume = values.astype(dtype).reshape(shape)
            got = sample_separable(volume, grid, truncate=dtype == np.int16).numpy().ravel()
            np.testing.assert_array_equal(got, np.trunc(linear) if dtype == np.int16 else linear)
            got = sample_separable(volume, grid, "nearest").numpy().ravel()
            np.testing.assert_array_equal(got, nearest)


def test_point_maps_take_lists_arrays_and_tensors_in_float64_and_name_a_wrong_shape():
    prep = PreparedScan(_linear_scan(ORIENTATIONS["PSR"]))
    clicks = [[1, 2, 3], [4, 0, 2]]
    expected = prep.to_canonical(np.array(clicks, dtype=np.float64))
    for given in (clicks, torch.tensor(clicks, dtype=torch.float64, requires_grad=True)):
        np.testing.assert_array_equal(prep.to_canonical(given), expected)
    assert prep.check_inside(clicks).dtype == np.float64  # integer clicks come back as float64, as documented
    np.testing.assert_array_equal(prep.to_original(torch.tensor(expected)), prep.to_original(expected))
    with pytest.raises(ValueError, match=r"^points must have shape \(N, 3\), got \(3,\)$"):
        prep.to_canonical([1, 2, 3])
    with pytest.raises(ValueError, match=r"^points must have shape \(N, 3\), got \(2, 4\)$"):
        prep.to_original(np.zeros((2, 4)))


def test_resampled_volume_matches_crops():
    prep = PreparedScan(_linear_scan(ORIENTATIONS["oblique"]))
    whole = prep.resampled()
    assert tuple(whole.shape) == prep.shape
    crop = prep.crop((2, 3, 4), 8)
    np.testing.assert_allclose(crop.raw.numpy(), whole[2:10, 3:11, 4:12].numpy(), atol=1e-4)


def test_every_real_case_crop_sees_its_label_at_the_click(data_dir):
    """Geometry against real headers (LPS, RAS, LAS, PSR, oblique): a labelled voxel, taken to the crop grid,
    lands on the label there."""
    for dataset, case, image, label in data_cases(data_dir):
        prep = PreparedScan.load(image)
        lab = np.asarray(nib.load(str(label)).dataobj).astype(np.uint8)
        assert lab.shape == prep.scan.shape, case
        # The deepest labelled voxel: its neighbours (which nearest sampling at 1.5 mm may pick) are labelled.
        found = np.argwhere(lab > 0)
        lo, hi = found.min(0), found.max(0) + 1
        depth = distance_transform_edt(np.pad(lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] > 0, 1),
                                       sampling=prep.scan.spacing_mm)
        click = (np.array(np.unravel_index(np.argmax(depth), depth.shape)) - 1 + lo)[None]
        crop = prep.crop_around(click, 64)
        crop_lab = crop.sample(lab)
        d, h, w = np.floor(crop.to_crop(click)[0] + 0.5).astype(int)
        assert crop_lab[d, h, w] > 0, f"{dataset}/{case}: click {click[0]} misses its label in the crop"
        assert "".join(nib.aff2axcodes(prep.affine)) == "RAS", case


def test_outer_take_equals_the_fancy_index():
    """``outer_take`` (one axis at a time, used by the paste-back) gives ``values[np.ix_(*index)]`` exactly, for
    monotone (paste-back) and arbitrary indices, any dtype and memory order."""
    from sam_med3d.geometry import outer_take

    rng = np.random.default_rng(3)
    for trial in range(12):
        shape = tuple(int(n) for n in rng.integers(1, 9, 3))
        values = rng.normal(size=shape).astype((np.float32, np.uint8, np.float64)[trial % 3])
        if trial % 2:
            values = np.asfortranarray(values)
        index = [np.sort(rng.integers(0, n, rng.integers(1, 12))) if trial % 4 < 2 else rng.integers(0, n, 7)
                 for n in shape]
        got = outer_take(values.transpose(2, 0, 1), [index[2], index[0], index[1]])
        expected = values.transpose(2, 0, 1)[np.ix_(index[2], index[0], index[1])]
        assert got.flags.c_contiguous and got.dtype == values.dtype
        np.testing.assert_array_equal(got, expected)


def test_a_click_is_inside_up_to_half_a_voxel_beyond_the_edge_voxels():
    """The boundaries exactly: a click rounds to a voxel of the scan (or crop) or is refused, never clamped."""
    volume = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    prep = PreparedScan(load_scan(volume, np.diag([1.5, 1.5, 1.5, 1.0])))
    last = np.array([9, 11, 13], dtype=float)
    assert prep.check_inside([[-0.5, -0.5, -0.5], last + 0.49]).shape == (2, 3)
    for outside in ([-0.51, 0, 0], [0, -1.0, 0], [9.5, 0, 0], [0, 11.5, 0], [0, 0, 13.5], [0, 0, 14]):
        with pytest.raises(ValueError, match="is outside the scan 10x12x14"):
            prep.check_inside([outside])
    with pytest.raises(ValueError, match=r"click \(-1.25, 2, 3\) is outside"):  # coordinates as given
        prep.check_inside([[-1.25, 2, 3]])
    with pytest.raises(ValueError, match=r"^seeds must have shape \(N, 3\)"):
        prep.check_inside([1, 2, 3], name="seed")

    # the canonical grid is the scan's here (RAS, 1.5 mm), so crop indices are scan indices minus start
    crop = prep.crop((2, 3, 4), 5)
    start, stop = np.array([2, 3, 4], dtype=float), np.array([7, 8, 9], dtype=float)
    points = np.array([start - 0.5, start - 0.51, stop - 0.5, stop - 0.51, start - [0, 0, 1.0], start + [0, 0, 4.0]])
    assert crop.contains(points).tolist() == [True, False, False, True, False, True]
    np.testing.assert_array_equal(crop.to_crop([[2, 3, 4], [6.5, 7.25, 8]]), [[0, 0, 0], [4.5, 4.25, 4]])


def test_paste_back_refuses_a_wrong_out_and_takes_values_that_require_grad():
    volume = np.random.default_rng(1).random((10, 12, 14)).astype(np.float32)
    prep = PreparedScan(load_scan(volume, np.diag([1.5, 1.5, 1.5, 1.0])))
    crop = prep.crop((2, 3, 4), 5)
    with pytest.raises(ValueError, match=r"^out must have the scan's shape \(10, 12, 14\), got \(10, 12, 13\)$"):
        prep.paste_back(crop, np.ones((5, 5, 5), dtype=np.float32), out=np.zeros((10, 12, 13), dtype=np.float32))
    with pytest.raises(ValueError, match="^the crop belongs to another scan$"):
        PreparedScan(load_scan(volume)).paste_back_region(crop, np.ones((5, 5, 5)))
    logits = torch.arange(125, dtype=torch.float32).reshape(5, 5, 5).requires_grad_()  # straight from a model
    pasted = prep.paste_back(crop, logits)
    np.testing.assert_array_equal(pasted[2:7, 3:8, 4:9], logits.detach().numpy())
    assert pasted.sum() == logits.detach().sum().item()


def test_a_crop_that_misses_the_scan_pastes_nothing_and_keeps_the_dtype():
    volume = np.random.default_rng(2).random((10, 12, 14)).astype(np.float32)
    prep = PreparedScan(load_scan(volume, np.diag([1.5, 1.5, 1.5, 1.0])))
    outside = prep.crop((20, 20, 20), 4)
    region, values = prep.paste_back_region(outside, np.ones((4, 4, 4), dtype=np.uint8))
    assert region is None and values.shape == (0, 0, 0) and values.dtype == np.uint8
    pasted = prep.paste_back(outside, np.ones((4, 4, 4), dtype=np.uint8))
    assert pasted.dtype == np.uint8 and pasted.shape == (10, 12, 14) and not pasted.any()


def _ras_1p5mm_prep(shape=(100, 100, 100)) -> PreparedScan:
    """A RAS scan at 1.5 mm: its canonical grid is the scan's own, so canonical indices are the clicks'."""
    volume = np.random.default_rng(4).random(shape).astype(np.float32)
    prep = PreparedScan(load_scan(volume, np.diag([1.5, 1.5, 1.5, 1.0])))
    assert prep.shape == shape
    return prep


def test_place_crop_centres_on_the_positive_clicks_and_otherwise_on_the_latest_intent():
    """``place_crop``: on all positive clicks when they fit; else on the ``new`` clicks (their positives), else on
    the latest positive click, else (negatives only) on the latest click. start = floor((lo + hi) / 2) - 8."""
    from sam_med3d.geometry import place_crop

    prep = _ras_1p5mm_prep()
    near = np.array([[40, 40, 40], [46, 46, 46]])
    assert place_crop(prep, near, np.array([1, 1]), 16).start == (35, 35, 35)  # (40 + 47) // 2 - 8
    assert place_crop(prep, near, np.array([1, 1]), 16, new=[1]).start == (35, 35, 35)  # the new click is in it
    # a negative click does not pull the crop, not even a new one (the new positive is what must be inside)
    with_negative = np.array([[40, 40, 40], [46, 46, 46], [70, 70, 70]])
    assert place_crop(prep, with_negative, np.array([1, 1, 0]), 16).start == (35, 35, 35)
    assert place_crop(prep, with_negative, np.array([1, 1, 0]), 16, new=[1, 2]).start == (35, 35, 35)
    spread = np.array([[10, 10, 10], [80, 80, 80], [50, 50, 50]])
    # positives 10 and 80 do not fit in one crop (centred at 45 it holds neither): the latest positive wins,
    # not the later negative click (which that crop holds)
    assert place_crop(prep, spread, np.array([1, 1, 0]), 16).start == (72, 72, 72)
    assert place_crop(prep, spread[[1, 0, 2]], np.array([1, 1, 0]), 16).start == (2, 2, 2)
    three = np.array([[80, 80, 80], [10, 10, 10], [12, 12, 12]])
    assert place_crop(prep, three, np.array([1, 1, 1]), 16).start == (4, 4, 4)  # (12 + 13) // 2 - 8
    # negatives only: the latest click
    assert place_crop(prep, spread[:2], np.array([0, 0]), 16).start == (72, 72, 72)
    assert place_crop(prep, spread[[1, 0]], np.array([0, 0]), 16).start == (2, 2, 2)
    # the new clicks decide, centred on their positives only (the new negative at 50 is left out)
    assert place_crop(prep, spread, np.array([1, 1, 0]), 16, new=[0, 2]).start == (2, 2, 2)
    assert place_crop(prep, spread, np.array([1, 1, 0]), 16, new=[1]).start == (72, 72, 72)
    # a new negative click only: the crop on all positives is kept when it holds it
    assert place_crop(prep, spread, np.array([1, 1, 0]), 16, new=[2]).start == (37, 37, 37)
    assert place_crop(prep, spread, np.array([1, 1, 0]), 16, new=[]).start == (72, 72, 72)  # empty: no new click


def test_crop_keeps_clicks_only_when_every_new_positive_click_is_inside():
    from sam_med3d.geometry import crop_keeps_clicks

    prep = _ras_1p5mm_prep()
    crop = prep.crop((30, 30, 30), 16)  # canonical voxels 30 .. 45
    inside, outside = [35, 40, 45], [46, 40, 40]
    assert crop_keeps_clicks(crop, np.array([inside, [30, 30, 30]]), np.array([1, 1]))
    assert not crop_keeps_clicks(crop, np.array([outside]), np.array([1]))
    assert not crop_keeps_clicks(crop, np.array([inside, outside]), np.array([1, 1]))
    # a negative click outside the crop does not move it
    assert crop_keeps_clicks(crop, np.array([outside]), np.array([0]))
    assert crop_keeps_clicks(crop, np.array([outside, inside]), np.array([0, 1]))
    assert not crop_keeps_clicks(crop, np.array([inside, outside]), np.array([0, 1]))
    assert crop_keeps_clicks(crop, np.zeros((0, 3)), np.zeros(0, np.int64))


def test_crop_of_a_mask_takes_torch_masks_centres_an_empty_mask_and_names_a_wrong_shape():
    volume = np.random.default_rng(5).random((10, 12, 14)).astype(np.float32)
    prep = PreparedScan(load_scan(volume, np.diag([1.5, 1.5, 1.5, 1.0])))  # canonical grid = the scan's
    mask = np.zeros((10, 12, 14), np.uint8)
    mask[2:4, 3:6, 4] = 3
    # box [2, 4) x [3, 6) x [4, 5): start = (lo + hi) // 2 - 2
    assert prep.crop_box_of_mask(mask, 4) == (1, 2, 2)
    assert prep.crop_box_of_mask(torch.from_numpy(mask), 4) == (1, 2, 2)
    # an empty mask: the centre of the canonical grid, as CropOrPad does without a label
    assert prep.crop_box_of_mask(np.zeros_like(mask), 4) == (3, 4, 5)
    assert prep.crop_box_of_mask(np.zeros_like(mask), 5) == (3, 4, 5)
    with pytest.raises(ValueError, match=r"^mask of shape \(10, 12, 13\) does not match the scan 10x12x14$"):
        prep.crop_box_of_mask(np.zeros((10, 12, 13), np.uint8), 4)
    # a 0.5 mm mask voxel that no 1.5 mm voxel takes (their centres are at stored index 1 + 3 t): nothing of the
    # mask is left on the canonical grid, so the crop is the grid's centre, as for an empty mask
    fine = PreparedScan(load_scan(np.random.default_rng(5).random((30, 30, 30)).astype(np.float32),
                                  np.diag([0.5, 0.5, 0.5, 1.0])))
    assert fine.shape == (10, 10, 10)
    speck = np.zeros((30, 30, 30), np.uint8)
    speck[0, 0, 0] = 1
    assert fine.crop_box_of_mask(speck, 4) == (3, 3, 3)
    assert fine.crop_box_of_mask(speck, 5) == (3, 3, 3)


def test_crop_around_clicks_rounds_them_to_voxels_and_names_bad_input():
    """The clicks' nearest canonical voxels (ties up) make the box; all clicks count when none is positive."""
    volume = np.random.default_rng(6).random((10, 12, 14)).astype(np.float32)
    prep = PreparedScan(load_scan(volume, np.diag([1.5, 1.5, 1.5, 1.0])))  # canonical grid = the scan's
    clicks = [[2, 3, 4], [6, 7, 8]]
    # box [2, 7) x [3, 8) x [4, 9): start = (lo + hi) // 2 - 2
    assert prep.crop_box_around(clicks, 4) == (2, 3, 4)
    assert prep.crop_box_around(clicks, 4, [0, 0]) == (2, 3, 4)
    assert prep.crop_box_around(clicks, 4, np.array([[1], [0]])) == (0, 1, 2)  # the first click's voxel only
    assert prep.crop_box_around(clicks, 4, torch.tensor([0, 1])) == (4, 5, 6)
    # (2.5, 3.49, 4.5) is voxel (3, 3, 5)
    assert prep.crop_box_around([[2.5, 3.49, 4.5]], 4) == (1, 1, 3)
    with pytest.raises(ValueError, match="^at least one point is needed to place a crop$"):
        prep.crop_box_around(np.zeros((0, 3)), 4)
    with pytest.raises(ValueError, match="^labels has 1 entries for 2 points$"):
        prep.crop_box_around(clicks, 4, [1])


def test_a_prepared_scan_says_what_it_is():
    """Its repr names the source, the stored shape and orientation, the canonical grid and its voxel size."""
    array = np.random.default_rng(0).normal(size=(40, 30, 56)).astype(np.float32)
    permuted = np.array([[0, 0, -1.5, 20], [1.5, 0, 0, -30], [0, -2.5, 0, 40], [0, 0, 0, 1.0]])
    assert repr(PreparedScan.load(array, permuted)) == \
        "PreparedScan('array': 40x30x56 AIL -> canonical 56x40x50 at 1.5 mm)"
    assert repr(PreparedScan.load(array, np.diag([3, 3, 3, 1.0]), spacing_mm=6)) == \
        "PreparedScan('array': 40x30x56 RAS -> canonical 20x15x28 at 6.0 mm)"
    assert PreparedScan.load(array, np.diag([3, 3, 3, 1.0]), spacing_mm=0.5).shape == (240, 180, 336)
    # Its index map is the map to the stored voxels, and the affine goes through it.
    prepared = PreparedScan.load(array, permuted)
    canonical = np.array([[3.0, 7.0, 11.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose((prepared.index_map @ np.c_[canonical, [1, 1]].T).T[:, :3],
                               prepared.to_original(canonical))
    np.testing.assert_allclose(prepared.affine, permuted @ prepared.index_map)
    for bad in (0, -1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"^spacing_mm must be > 0, got {bad}$"):
            PreparedScan.load(array, permuted, spacing_mm=bad)


def test_low_res_logits_are_upsampled_trilinearly_with_half_voxel_centres():
    """``upsample_logits`` as the official code (trilinear, ``align_corners=False``): two low-res voxels 0 and 1
    along an axis become 0, 0.25, 0.75, 1 on a grid twice as fine (output centres at -0.25, 0.25, 0.75, 1.25 low-res
    voxels, clamped at the ends), along whichever axis they vary; batch and mask axes are kept."""
    from sam_med3d.geometry import upsample_logits

    for axis in range(3):
        low = torch.zeros((1, 3, 2, 2, 2))
        low[(slice(None), slice(None)) + (slice(None),) * axis + (1,)] = 1.0
        low[:, 1] *= 4.0
        up = upsample_logits(low, 4)
        assert up.shape == (1, 3, 4, 4, 4) and up.dtype == torch.float32
        profile = up[0, 0].movedim(axis, 0)[:, 1, 2]
        assert profile.tolist() == [0.0, 0.25, 0.75, 1.0], axis
        torch.testing.assert_close(up[0, 1], 4.0 * up[0, 0])
        assert torch.equal(up[0, 0].movedim(axis, 0), profile[:, None, None].expand(4, 4, 4))


def test_a_crop_samples_another_volume_nearest_unless_told_otherwise():
    """``Crop.sample`` of a label map on a 3 mm scan (two crop voxels per scan voxel) keeps its values, as the
    training crops' labels need; asked for ``"linear"``, it interpolates between them, untruncated although the
    scan itself is stored as integers (its own samples are truncated as the official resampling does)."""
    prepared = PreparedScan.load((np.random.default_rng(0).normal(size=(12, 10, 8)) * 100).astype(np.int16),
                                 np.diag([3.0, 3.0, 3.0, 1.0]))
    assert prepared.scan.integer
    labels = (np.arange(12 * 10 * 8).reshape(12, 10, 8) % 5).astype(np.uint8)
    crop = prepared.crop((2, 3, 1), 8)
    nearest = crop.sample(labels)
    assert nearest.shape == (8, 8, 8) and set(np.unique(nearest.numpy())) <= set(range(5))
    torch.testing.assert_close(nearest, prepared.sample(labels, (2, 3, 1), (8, 8, 8), "nearest"))
    linear = crop.sample(labels.astype(np.float32), "linear")
    torch.testing.assert_close(linear, prepared.sample(labels.astype(np.float32), (2, 3, 1), (8, 8, 8)))  # default
    assert not np.all(np.isin(linear.numpy(), np.arange(5)))
    with pytest.raises(ValueError, match=r"^volume of shape \(12, 10, 7\) does not match the scan 12x10x8$"):
        prepared.sample(labels[:, :, :7], (2, 3, 1), (8, 8, 8))
    # A crop of one voxel is a crop; of none, an error. A crop is known by its start and size (the embedding
    # cache's key).
    assert prepared.crop((4, 4, 4), 1).sample(labels).tolist() == [[[labels[2, 2, 2]]]]
    assert prepared.crop((4, 4, 4), 1).key == ((4, 4, 4), 1) != prepared.crop((4, 4, 5), 1).key
    with pytest.raises(ValueError, match=r"^crop size must be >= 1, got 0$"):
        prepared.crop((4, 4, 4), 0)


def test_the_official_grid_has_the_canonical_shape_on_a_scan_two_slices_thin():
    """Two 3 mm slices become four 1.5 mm voxels on both the canonical grid and the official one (SimpleITK's
    reference grid), in whichever order the scan stores its axes, and two 0.5 mm slices one; a scan of one slice
    is refused before."""
    array = np.random.default_rng(0).normal(size=(40, 2, 3)).astype(np.float32)
    for affine in (np.diag([-1.5, 3.0, 5.0, 1.0]), np.array([[0, 3.0, 0, 0], [0, 0, -5.0, 0], [1.5, 0, 0, 0],
                                                                [0, 0, 0, 1.0]])):
        prepared = PreparedScan.load(array, affine)
        assert sorted(prepared.shape) == [4, 10, 40]
        assert tuple(int(n) for n in prepared.itk.size[prepared.source_axis]) == prepared.shape
    # Two 0.5 mm slices make one 1.5 mm voxel, on both grids.
    thin = PreparedScan.load(array, np.diag([-1.5, 0.5, 5.0, 1.0]))
    assert thin.shape == (40, 1, 10) and tuple(int(n) for n in thin.itk.size[thin.source_axis]) == thin.shape
    with pytest.raises(ValueError, match="single slice"):
        PreparedScan.load(array[:, :1], np.diag([-1.5, 3.0, 5.0, 1.0]))


def test_sampling_entirely_outside_the_volume_gives_zeros_of_the_right_type_and_shape():
    """Samples that all miss the volume: zeros of the requested shape, in the volume's type for nearest sampling
    (label maps stay integer) and float32 for linear. Linear sampling by default interpolates without the
    truncation of integer scans."""
    labels = np.full((6, 5, 4), 3, np.uint8)
    away = [np.arange(20.0, 27.0), np.arange(2.0), np.arange(3.0)]
    nearest = sample_separable(labels, away, "nearest")
    assert nearest.shape == (7, 2, 3) and nearest.dtype == torch.uint8 and not nearest.any()
    linear = sample_separable(labels, away)
    assert linear.shape == (7, 2, 3) and linear.dtype == torch.float32 and not linear.any()
    ramp = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 5, 4), np.float32)
    halfway = sample_separable(ramp, [np.array([0.5, 2.25]), np.array([1.0]), np.array([2.0])])
    assert halfway.flatten().tolist() == [0.5, 2.25]
    # Partly outside: the same types, zeros where outside.
    part = [np.arange(4.0, 8.0), np.arange(2.0), np.arange(3.0)]
    nearest = sample_separable(labels, part, "nearest")
    assert nearest.dtype == torch.uint8 and nearest[:2].eq(3).all() and not nearest[2:].any()
    truncated = sample_separable((ramp * 100).astype(np.int16), [np.array([0.5, 2.25, 9.0]), np.array([1.0]),
                                                                  np.array([2.0])], truncate=True)
    assert truncated.dtype == torch.float32 and truncated.flatten().tolist() == [50.0, 225.0, 0.0]
