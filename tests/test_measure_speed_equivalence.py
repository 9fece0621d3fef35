"""The measure stage's faster paths give exactly what the plain computations they replaced give.

Correctness only: nothing here is timed. Each test pits a fast path against the straightforward
computation (kept here as the reference): the in-plane distance maps computed only on the slices the
rays read, the thickness maps streamed from the plate's box, the bounded k-d tree searches, the label
masks and dilations, the plates measured beside QC/anatomy/lesions on any number of threads, and the
native thread limits set and restored.
"""

from __future__ import annotations

import gzip
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from bml_pipeline.io import write_nifti
from bml_pipeline.labels import load_schema
from bml_pipeline.measure import (
    cartilage_thickness,
    mapfile,
    measure_labels,
    thickness,
    volumes,
    write_measurements,
)
from bml_pipeline.measure.frame import _gap
from bml_pipeline.measure.threads import _blas_get, _itk_get, blas_single_threaded, itk_single_threaded
from bml_pipeline.measure.volumes import label_mask
from bml_pipeline.synth.plates import flat_plate
from bml_pipeline.volume import Volume, VolumeMeta, bounding_box

SCHEMA = load_schema("oai_zib")
THICK = (0.3125, 0.3125, 1.5)
OBLIQUE = np.array([[0.4 * np.cos(0.5), -0.5 * np.sin(0.5), 0, 10], [0.4 * np.sin(0.5), 0.5 * np.cos(0.5), 0, -20],
                    [0, 0, 0.8, 5], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def tilted_plate():
    """A 2 mm plate 35 deg to the 1.5 mm slices: the shape-based step is used on most of its rays."""
    return flat_plate(2.0, THICK, angles_deg=(35, -15, 25), offset_mm=(0.11, 0.07, 0.13), size_mm=20, supersample=2)


def toy_knee() -> Volume:
    """Femur (with a lesion) above tibia, cartilage on both, a patella in front (as in test_measure)."""
    a = np.zeros((60, 50, 70), dtype=np.uint16)
    a[5:55, 10:40, 38:68] = 1
    a[5:55, 10:40, 35:38] = 2
    a[5:55, 10:40, 31:34] = 4
    a[5:55, 10:40, 2:31] = 3
    a[20:40, 43:48, 40:55] = 5
    a[20:40, 41:43, 40:55] = 6
    a[20:30, 15:25, 45:52] = 7
    return Volume(a, OBLIQUE, VolumeMeta(source="toy.nii.gz"))


def _reference_slice_signed_distance(mask: np.ndarray, spacing, axis: int, cap_mm: float = 10.0) -> np.ndarray:
    """The transform as first written: every slice, one after the other."""
    import SimpleITK as sitk

    in_plane = [float(s) for a, s in enumerate(spacing) if a != axis][::-1]
    slices = np.moveaxis(mask, axis, 0)
    out = np.empty(slices.shape, dtype=np.float32)
    for k in range(len(slices)):
        plane = slices[k]
        count = int(np.count_nonzero(plane))
        if count in (0, plane.size):
            out[k] = cap_mm if count else -cap_mm
            continue
        signed = np.zeros(plane.shape, dtype=np.float32)
        for region, sign in ((plane, 0.5), (~plane, -0.5)):
            image = sitk.GetImageFromArray(np.ascontiguousarray(region).view(np.uint8))
            image.SetSpacing(in_plane)
            transform = sitk.SignedMaurerDistanceMapImageFilter()
            transform.SetInsideIsPositive(True)
            transform.SetSquaredDistance(False)
            transform.SetUseImageSpacing(True)
            signed += np.float32(sign) * sitk.GetArrayFromImage(transform.Execute(image))
        out[k] = np.clip(signed, -cap_mm, cap_mm)
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("axis", [0, 2])
def test_slice_distance_equals_the_transform_of_every_slice(axis: int) -> None:
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((14, 30, 26)), 2.0) > 0.5
    mask[2] = True  # a slice without an edge
    mask[5] = False
    spacing = np.array([0.7, 0.365, 0.4]) if axis == 0 else np.array([0.365, 0.4, 1.5])
    reference = _reference_slice_signed_distance(mask, spacing, axis)
    assert np.array_equal(thickness._slice_signed_distance(mask, spacing, axis), reference)
    # On demand: only the slices asked for are filled, with exactly their values.
    lazy = thickness._SliceDistance(mask, spacing, axis)
    idx = np.zeros((3, 3))
    idx[:, axis] = [3.2, 3.9, 8.0]
    lazy.require(idx)
    done = np.flatnonzero(lazy._done)
    assert set(done) == {2, 3, 4, 5, 7, 8, 9, 10}  # floor +- the margin of one slice, and floor + 2
    for k in done:
        assert np.array_equal(np.take(lazy.field, k, axis=axis), np.take(reference, k, axis=axis))


def test_thickness_reads_only_computed_slices_and_equals_the_full_computation(tilted_plate, monkeypatch) -> None:
    lazy = cartilage_thickness(tilted_plate.labels, SCHEMA, "femoral_cartilage")
    computed = []
    original = thickness._SliceDistance.compute
    monkeypatch.setattr(thickness._SliceDistance, "require", lambda self, idx: self.compute(np.arange(self.slice_count)))
    monkeypatch.setattr(thickness._SliceDistance, "compute",
                        lambda self, slices: (computed.append(len(slices)), original(self, slices))[1])
    full = cartilage_thickness(tilted_plate.labels, SCHEMA, "femoral_cartilage")
    assert computed, "the shape-based step did not run on this phantom"
    assert lazy.stats == full.stats and lazy.stats is not None
    for name in ("thickness_mm", "points_mm", "normals", "areas_mm2", "map_crop"):
        assert np.array_equal(getattr(lazy, name), getattr(full, name)), name
    assert lazy.map_box == full.map_box


def _reference_close(points: np.ndarray, selected: np.ndarray, radius: float) -> np.ndarray:
    if not selected.any():
        return selected
    dilated = np.isfinite(cKDTree(points[selected]).query(points, distance_upper_bound=radius + 1e-9)[0])
    if dilated.all():
        return dilated
    return dilated & ~np.isfinite(cKDTree(points[~dilated]).query(points, distance_upper_bound=radius + 1e-9)[0])


def test_surface_closing_and_distances_equal_the_plain_tree_searches() -> None:
    rng = np.random.default_rng(5)
    points = rng.random((4000, 3)) * [30.0, 30.0, 2.0]
    for fraction in (0.0, 0.3, 0.7, 1.0):
        selected = rng.random(len(points)) < fraction
        for radius in (0.5, 1.5):
            assert np.array_equal(thickness._close_on_surface(points, selected, radius),
                                  _reference_close(points, selected, radius))
    query, target = rng.random(len(points)) < 0.5, rng.random(len(points)) < 0.2
    plain = np.full(len(points), np.inf)
    plain[query] = cKDTree(points[target]).query(points[query], distance_upper_bound=2.0)[0]
    assert np.array_equal(thickness._distance_to(points, query, target, 2.0), plain)


def test_bounded_gap_is_the_smallest_distance_or_inf_beyond_the_bound() -> None:
    rng = np.random.default_rng(7)
    a = rng.random((500, 3)) * 10.0
    b = rng.random((3000, 3)) * 40.0
    for shift in (0.0, 3.0, 12.0, 30.0, 200.0):
        moved = a + [shift, 0.0, 0.0]
        exact = float(cKDTree(b).query(moved)[0].min())
        assert _gap(moved, b) == exact
        assert _gap(moved, b, 20.0) == (exact if exact <= 20.0 else np.inf)
    assert _gap(a[:0], b, 20.0) == np.inf


def test_label_helpers_equal_isin_bincount_bounding_box_and_binary_dilation(monkeypatch) -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 9, size=(17, 12, 9)).astype(np.uint16)
    for ids in ((1,), (1, 7), (2, 3, 8), ()):
        assert np.array_equal(label_mask(labels, ids), np.isin(labels, ids))
    sparse = np.zeros((13, 11, 9), dtype=np.uint16)
    sparse[3, 4, 5], sparse[7, 2:6, 8], sparse[12, 0, 0] = 1, 2, 3
    monkeypatch.setattr(volumes, "COUNT_CHUNK", 50)
    for chunk in (1, 7, 100, 1 << 20):  # slabs of one plane, several planes, the whole map
        monkeypatch.setattr(volumes, "BOX_CHUNK", chunk)
        for view in (sparse, np.asfortranarray(sparse), sparse[::-1, :, ::2], sparse.transpose(2, 0, 1), labels):
            for value in (1, 2, 3, 4):
                for margin in (0, 1):
                    assert volumes.label_box(view, value, margin) == bounding_box(view == value, margin)
            assert np.array_equal(volumes.label_counts(Volume(view, np.eye(4))), np.bincount(view.ravel()))
    for shape in ((17, 12, 9), (1, 4, 4), (3, 1, 2)):
        mask = rng.random(shape) > 0.8
        assert np.array_equal(thickness._dilate_faces(mask),
                              ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(3, 1)))


@pytest.mark.parametrize("zero_block", [1 << 16, 4096, 100, 7])
def test_streamed_map_is_the_file_write_nifti_writes(tmp_path, monkeypatch, zero_block: int) -> None:
    """Decompressed, the streamed file is byte for byte write_nifti's (header and voxels), whichever
    way its zeros are split into precomputed segments; gzip's CRC-32 and length check pass."""
    monkeypatch.setattr(mapfile, "ZERO_BLOCK", zero_block)
    mapfile._zeros.cache_clear()
    mapfile._zero_block.cache_clear()
    rng = np.random.default_rng(zero_block)
    shape = (23, 31, 40)
    boxes = [(slice(2, 10), slice(0, 31), slice(5, 39)), (slice(0, 23), slice(0, 31), slice(0, 40)),
             (slice(22, 23), slice(30, 31), slice(39, 40)), (slice(4, 9), slice(7, 20), slice(0, 1)),
             (slice(0, 0), slice(0, 0), slice(0, 0))]
    try:
        for i, box in enumerate(boxes):
            crop_shape = tuple(s.stop - s.start for s in box)
            crop = (rng.random(crop_shape) * (rng.random(crop_shape) > 0.6)).astype(np.float32)
            crop[rng.random(crop_shape) > 0.97] = -0.0  # a different bit pattern from 0.0: kept
            full = np.zeros(shape, dtype=np.float32)
            full[box] = crop
            grid = Volume(np.broadcast_to(np.zeros(1, np.uint8), shape), OBLIQUE)
            write_nifti(grid.with_array(full), tmp_path / f"plain{i}.nii.gz")
            mapfile.write_cropped_map(tmp_path / f"streamed{i}.nii.gz", crop, box, grid)
            plain = gzip.decompress((tmp_path / f"plain{i}.nii.gz").read_bytes())
            streamed = gzip.decompress((tmp_path / f"streamed{i}.nii.gz").read_bytes())
            assert streamed == plain, box
    finally:
        mapfile._zeros.cache_clear()
        mapfile._zero_block.cache_clear()


def test_measure_is_the_same_on_one_or_two_threads_and_writes_write_nifti_maps(tmp_path, monkeypatch) -> None:
    import nibabel as nib

    results = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        m = measure_labels(toy_knee(), SCHEMA, side="right")
        results[threads] = m
        write_measurements(tmp_path / threads, m, {"step": "measure"})
    assert json.dumps(results["1"].to_dict(), sort_keys=True) == json.dumps(results["2"].to_dict(), sort_keys=True)
    assert results["1"].thickness
    for plate, result in results["2"].thickness.items():
        write_nifti(result.thickness_map, tmp_path / f"plain_{plate}.nii.gz")
        streamed = tmp_path / "2" / f"thickness_{plate}.nii.gz"
        assert gzip.decompress(streamed.read_bytes()) == gzip.decompress((tmp_path / f"plain_{plate}.nii.gz").read_bytes())
        image = nib.load(streamed)
        assert np.array_equal(np.asarray(image.dataobj), result.thickness_map.array)
        assert np.allclose(image.affine, OBLIQUE)


def test_native_thread_limits_are_set_inside_and_restored_after_the_last_user() -> None:
    before_blas, before_itk = _blas_get(), _itk_get()
    barrier = threading.Barrier(3)

    def user(_: int) -> tuple[list[int], list[int]]:
        with blas_single_threaded(), itk_single_threaded():
            barrier.wait(timeout=30)
            inside = (_blas_get(), _itk_get())
            barrier.wait(timeout=30)
        return inside

    with ThreadPoolExecutor(max_workers=3) as pool:
        for blas, itk in pool.map(user, range(3)):
            assert all(n == 1 for n in blas) and itk == [1]
    assert _blas_get() == before_blas and _itk_get() == before_itk
