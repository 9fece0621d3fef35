"""How well can a binary label map place a curved surface? A 2D check of the limit behind the phantom's
pose dependence (BENCHMARKS.md, "Longitudinal").

Discs of radius 20 and 22 mm (a 2 mm "plate" between them) are rasterized at 0.365 mm pixels (5 x 5
sub-samples per pixel, fraction >= 0.5) at random sub-pixel placements. The mean radius over an 80-deg arc
at a random orientation is estimated by each method below, and the printed number per placement is the
error of the plate's mean thickness (%), with the SD over placements:

- ``smoothed``: the 0.5 level of the labels smoothed by 0.6 pixel (as the measure stage);
- ``local fit``: local quadratic fits (2 mm windows) to the boundary crossings between unlike neighbour
  pixels, each weighted by how precisely it locates the curve along its normal;
- ``thin-plate``: a surface reconstructed from the labels under a thin-plate smoothness prior
  (biharmonic energy, minimized by projected descent subject to the labels' signs; as Lempitsky 2010).

With a curve repeated along a line, a map holds about one independent crossing per pixel column: about
100 crossings with 0.29 pixel of quantization noise each leave about 0.01 mm on the mean radius, 0.5-0.7 %
of 2 mm, and no local estimate recovers what the map does not hold.

Usage: ``python scripts/diagnose_binary_limit_2d.py [--placements 12] [--prior]`` (``--prior`` adds the
thin-plate row, about 7 s a placement).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

PIXEL_MM = 0.365
SIZE = 160
RADII_MM = (20.0, 22.0)


def rasterize(radius: float, centre: np.ndarray, supersample: int = 5) -> np.ndarray:
    """Disc of ``radius`` (mm) about ``centre`` (mm, (y, x)): pixels at least half inside."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    inside = np.zeros((SIZE, SIZE))
    for dy in offsets:
        for dx in offsets:
            inside += ((y + dy) * PIXEL_MM - centre[0]) ** 2 + ((x + dx) * PIXEL_MM - centre[1]) ** 2 <= radius**2
    return inside / supersample**2 >= 0.5


def radius_on_level(field: np.ndarray, centre: np.ndarray, angles: np.ndarray, level: float,
                    near: float) -> np.ndarray:
    """Radius (mm) where ``field`` (higher inside) crosses ``level`` along rays at ``angles``, searched
    within 3 mm of ``near``."""
    r = np.arange(near - 3.0, near + 3.0, 0.01)
    y = (centre[0] + np.outer(np.sin(angles), r)) / PIXEL_MM
    x = (centre[1] + np.outer(np.cos(angles), r)) / PIXEL_MM
    v = ndimage.map_coordinates(field, [y.ravel(), x.ravel()], order=1).reshape(y.shape) - level
    k = np.argmax((v[:, :-1] >= 0) & (v[:, 1:] < 0), axis=1)
    rows = np.arange(len(angles))
    return r[k] + 0.01 * v[rows, k] / (v[rows, k] - v[rows, k + 1])


def smoothed(disc: np.ndarray, centre: np.ndarray, angles: np.ndarray, radius: float) -> np.ndarray:
    return radius_on_level(ndimage.gaussian_filter(disc.astype(float), 0.6), centre, angles, 0.5, radius)


def local_fit(disc: np.ndarray, centre: np.ndarray, angles: np.ndarray, radius: float,
              window_mm: float = 2.0) -> np.ndarray:
    points, axes = [], []
    for axis in (0, 1):
        a, b = (disc[:-1, :], disc[1:, :]) if axis == 0 else (disc[:, :-1], disc[:, 1:])
        yy, xx = np.nonzero(a != b)
        p = np.stack([yy, xx], 1).astype(float)
        p[:, axis] += 0.5
        points.append(p * PIXEL_MM)
        axes.append(np.full(len(p), axis))
    points, axes = np.concatenate(points), np.concatenate(axes)
    tree = cKDTree(points)
    out = []
    for angle in angles:
        normal = np.array([np.sin(angle), np.cos(angle)])
        foot = centre + radius * normal
        idx = tree.query_ball_point(foot, window_mm)
        q = points[idx] - foot
        u, h = q @ np.array([-normal[1], normal[0]]), q @ normal
        along = np.abs(normal[axes[idx]])  # a crossing between neighbours along an axis is vague along it
        w = np.exp(-(u / window_mm) ** 2) * (1.0 - along**2 + 0.02)
        design = np.stack([np.ones_like(u), u, u * u], 1) * np.sqrt(w)[:, None]
        out.append(radius + np.linalg.lstsq(design, h * np.sqrt(w), rcond=None)[0][0])
    return np.array(out)


def thin_plate(disc: np.ndarray, centre: np.ndarray, angles: np.ndarray, radius: float,
               iterations: int = 8000, band_px: float = 3.0, step: float = 0.015) -> np.ndarray:
    signed = 0.5 * (ndimage.distance_transform_edt(disc) - ndimage.distance_transform_edt(~disc))
    field = ndimage.gaussian_filter(signed, 1.0)
    free = np.abs(signed) < band_px
    inside, outside = disc & free, ~disc & free
    for _ in range(iterations):
        field = np.where(free, field - step * ndimage.laplace(ndimage.laplace(field)), signed)
        field[inside] = np.maximum(field[inside], 0.0)
        field[outside] = np.minimum(field[outside], 0.0)
    return radius_on_level(field, centre, angles, 0.0, radius)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placements", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", action="store_true", help="add the thin-plate reconstruction (slow)")
    args = parser.parse_args()
    methods = {"smoothed": smoothed, "local fit": local_fit}
    if args.prior:
        methods["thin-plate"] = thin_plate
    rng = np.random.default_rng(args.seed)
    placements = []
    for _ in range(args.placements):
        centre = np.full(2, SIZE * PIXEL_MM / 2) + rng.uniform(-0.5, 0.5, 2) * PIXEL_MM
        middle = np.pi / 2 + np.radians(rng.uniform(-45, 45))
        placements.append((centre, middle + np.radians(np.linspace(-40, 40, 161))))
    print(f"Plate between discs of {RADII_MM[0]:g} and {RADII_MM[1]:g} mm at {PIXEL_MM} mm pixels: thickness error "
          f"(%) of the mean over an 80-deg arc, {args.placements} placements")
    for name, method in methods.items():
        errors = []
        for centre, angles in placements:
            inner, outer = (method(rasterize(r, centre), centre, angles, r).mean() - r for r in RADII_MM)
            errors.append(100 * (outer - inner) / (RADII_MM[1] - RADII_MM[0]))
        e = np.array(errors)
        print(f"  {name:<10} {' '.join(f'{v:+.2f}' for v in e)}   SD {e.std():.2f} %, mean {e.mean():+.2f} %")


if __name__ == "__main__":
    main()
