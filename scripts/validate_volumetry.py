"""Accuracy of the volumetry stage against phantoms whose answer is known analytically.

Prints tables of errors:

1. mean cartilage thickness of flat plates (1.5-3 mm) rotated against the grid at the two clinical
   spacings, ours next to the plain reference (2 x EDT on the skeleton);
2. curved (cylinder, sphere), variable-thickness and thin plates (and plates and sheets at 3 mm slices);
3. a +2.4 % thickening, measured as the relative change of the mean (3b: at small tilts to 1.5 mm
   slices, over plate sizes and rasterizations, with and without shape-based interpolation);
4. BML volume, centroid and diameter of ellipsoidal lesions;
5. the synthetic knee phantom (bml_pipeline.synth.phantom): BML volumes, subregions, side, thickness;
6. real OAI label maps from ``../shared`` (no truth): our mean thickness next to the smoothed labels alone.

Usage: ``python scripts/validate_volumetry.py [--quick] [--no-knee] [--real N]``. Several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bml_pipeline.labels import load_schema
from bml_pipeline.measure import MeasureConfig, cartilage_thickness, measure_labels, skeleton_edt_thickness
from bml_pipeline.measure.lesions import find_lesions
from bml_pipeline.synth.plates import (
    CARTILAGE,
    cylinder_plate,
    flat_plate,
    lesion_block,
    rotation_matrix,
    sphere_plate,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = load_schema("oai_zib")
SPACINGS = {"0.365x0.365x0.7": (0.365, 0.365, 0.7), "0.3125x0.3125x1.5": (0.3125, 0.3125, 1.5)}
ANGLES = [(10, 20, 5), (35, -15, 25), (60, 30, -40)]
OFFSET = (0.11, 0.07, 0.13)


def ours_and_reference(ph) -> tuple[float, float]:
    stats = cartilage_thickness(ph.labels, SCHEMA, "femoral_cartilage").stats
    ref = skeleton_edt_thickness(ph.labels.array == CARTILAGE, ph.labels.spacing)
    return (stats.mean if stats else float("nan")), (ref if ref is not None else float("nan"))


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def flat_plates(quick: bool) -> None:
    rows, worst = [], {"ours": 0.0, "edt": 0.0}
    for name, spacing in SPACINGS.items():
        for t in ([1.5, 3.0] if quick else [1.5, 2.0, 3.0]):
            for angles in (ANGLES[1:2] if quick else ANGLES):
                ph = flat_plate(t, spacing, angles_deg=angles, offset_mm=OFFSET)
                ours, ref = ours_and_reference(ph)
                worst["ours"] = max(worst["ours"], abs(ours - t))
                worst["edt"] = max(worst["edt"], abs(ref - t))
                rows.append([name, f"{t:.2f}", str(angles), f"{ours:.4f}", f"{ours - t:+.4f}", f"{ref:.3f}", f"{ref - t:+.3f}"])
    table("1. Flat plates, 30 x 30 mm, rotated (mean thickness, mm; requirement |error| <= 0.05)",
          ["spacing (mm)", "truth", "angles (deg)", "ours", "error", "2xEDT", "error"], rows)
    print(f"worst |error|: ours {worst['ours']:.4f} mm, 2 x EDT on skeleton {worst['edt']:.3f} mm")


def plate_cases(spacing: tuple[float, float, float], quick: bool) -> list[tuple[str, object]]:
    """(label, phantom) of table 2 at ``spacing``; at 3 mm slices plates and sheets thinner than a slice."""
    if spacing[2] >= 3.0:
        if quick:
            return []
        return [("plate 2.0", flat_plate(2.0, spacing, angles_deg=(25, 40, 15), offset_mm=OFFSET)),
                ("thin sheet 1.0", flat_plate(1.0, spacing, angles_deg=(50, 20, -10), offset_mm=OFFSET)),
                ("thin sheet 0.8", flat_plate(0.8, spacing, angles_deg=(35, -15, 25), offset_mm=OFFSET))]
    cases = [
        ("cylinder R=20", cylinder_plate(2.0, 20.0, spacing, angles_deg=(20, 40, 10), offset_mm=OFFSET)),
        ("sphere R=25", sphere_plate(2.0, 25.0, spacing, angles_deg=(30, -20, 15), offset_mm=OFFSET)),
        ("variable 2+-0.8", flat_plate(2.0, spacing, amplitude_mm=0.8, angles_deg=(25, 15, -30), offset_mm=OFFSET)),
        ("thin sheet 1.0", flat_plate(1.0, spacing, angles_deg=(35, -15, 25), offset_mm=OFFSET)),
        ("thin sheet 0.8", flat_plate(0.8, spacing, angles_deg=(10, 20, 5), offset_mm=OFFSET)),
    ]
    return cases[:1] + cases[3:4] if quick else cases


def other_plates(quick: bool) -> None:
    rows = []
    for name, spacing in {**SPACINGS, "0.3x0.3x3.0": (0.3, 0.3, 3.0)}.items():
        for label, ph in plate_cases(spacing, quick):
            ours, ref = ours_and_reference(ph)
            t = ph.mean_thickness_mm
            rows.append([name, label, f"{t:.2f}", f"{ours:.4f}", f"{ours - t:+.4f}", f"{ref:.3f}", f"{ref - t:+.3f}"])
    table("2. Curved, variable and thin plates (mean thickness, mm)",
          ["spacing (mm)", "phantom", "truth", "ours", "error", "2xEDT", "error"], rows)


def thickening(quick: bool) -> None:
    rows = []
    angle_sets = ANGLES[1:2] if quick else ANGLES + [(45, 10, 70), (-25, 50, 15), (8, 0, 17), (15, 0, 17)]
    for name, spacing in SPACINGS.items():
        changes = []
        for angles in angle_sets:
            base = flat_plate(2.0, spacing, angles_deg=angles, offset_mm=OFFSET)
            grown = flat_plate(2.048, spacing, angles_deg=angles, offset_mm=OFFSET)
            (o0, r0), (o1, r1) = ours_and_reference(base), ours_and_reference(grown)
            changes.append(100 * (o1 / o0 - 1))
            tilt = np.degrees(np.arccos(abs(rotation_matrix(angles)[2, 2])))
            carried = 100 * (np.sum(grown.labels.array == CARTILAGE) / np.sum(base.labels.array == CARTILAGE) - 1)
            rows.append([name, str(angles), f"{tilt:.0f}", f"{changes[-1]:+.2f}", f"{100 * (r1 / r0 - 1):+.2f}",
                         f"{carried:+.2f}"])
        rows.append([name, "mean over angles", "", f"{np.mean(changes):+.2f}", "", ""])
    table("3. Thickening 2.000 -> 2.048 mm (+2.40 %; requirement 2.4 +- 0.3 %); tilt = angle between the\n"
          "   plate normal and the slice axis (small tilt at 1.5 mm slices = large voxel steps, most aliasing);\n"
          "   'labels' = change of the labelled cartilage volume: what the binary label map itself carries",
          ["spacing (mm)", "angles (deg)", "tilt", "ours (%)", "2xEDT (%)", "labels (%)"], rows)


def small_tilt_spread(quick: bool) -> None:
    """Thickening at small tilts to 1.5 mm slices over plate sizes and rasterizations (the label map's
    staircase depends on both), next to the smoothed-label estimate alone."""
    spacing = SPACINGS["0.3125x0.3125x1.5"]
    smoothed_only = MeasureConfig(shape_interp_full_step_mm=0, shape_interp_cutoff_step_mm=0)
    rows, errors = [], {"ours": [], "smoothed": []}
    angle_sets = [(15, 0, 17), (12, 0, 40)] if quick else [(8, 0, 17), (12, 0, 40), (15, 0, 17), (20, 0, 50),
                                                            (10, 20, 5), (35, -15, 25)]
    for angles in angle_sets:
        tilt = np.degrees(np.arccos(abs(rotation_matrix(angles)[2, 2])))
        for supersample in (3, 4):
            for size in (20, 30):
                kw = {"angles_deg": angles, "offset_mm": OFFSET, "supersample": supersample, "size_mm": size}
                base, grown = flat_plate(2.0, spacing, **kw), flat_plate(2.048, spacing, **kw)
                out = [f"{tilt:.0f}", str(angles), str(supersample), f"{size:g}"]
                for key, config in (("ours", None), ("smoothed", smoothed_only)):
                    m0, m1 = (cartilage_thickness(ph.labels, SCHEMA, "femoral_cartilage", config=config)
                              .stats.mean for ph in (base, grown))
                    errors[key].append(100 * (m1 / m0 - 1) - 2.4)
                    out += [f"{m0:.3f}", f"{100 * (m1 / m0 - 1):+.2f}"]
                rows.append(out)
    for key, e in errors.items():
        e = np.abs(np.array(e))
        rows.append(["", f"{key}: RMS error {np.sqrt(np.mean(e ** 2)):.2f} pp", "", "", "", "",
                     f"{int(np.sum(e > 0.3))}/{e.size} > 0.3 pp", ""])
    table("3b. Thickening 2.000 -> 2.048 mm at small tilts to 1.5 mm slices, by plate size (mm) and\n"
          "    supersampling of the rasterizer; 'smoothed' = smoothed labels only (shape-based\n"
          "    interpolation off)",
          ["tilt", "angles (deg)", "ss", "size", "ours mean", "ours (%)", "smoothed mean", "smoothed (%)"],
          rows)


def lesions(quick: bool) -> None:
    rows = []
    spec = [((-6, 2, 1), (7, 5, 4)), ((8, -6, -5), (5, 4, 3.5))]
    for name, spacing in SPACINGS.items():
        for angles in ([(25, -10, 40)] if quick else [(0, 0, 0), (25, -10, 40), (60, 20, -30)]):
            ph = lesion_block(spec, spacing, angles_deg=angles, block_mm=34)
            found = find_lesions(ph.labels, 7, 1, min_volume_mm3=0.5)
            for lesion, volume, centre, diameter in zip(found.lesions, ph.volumes_mm3, ph.centres_mm, ph.diameters_mm):
                rows.append([name, str(angles), f"{volume / 1000:.4f}", f"{100 * (lesion.volume_mm3 / volume - 1):+.3f}",
                             f"{np.linalg.norm(np.subtract(lesion.centroid_mm, centre)):.3f}",
                             f"{lesion.diameter_mm - diameter:+.2f}"])
    table("4. Ellipsoidal BMLs in a bone block (requirement: volume within 1 %)",
          ["spacing (mm)", "angles (deg)", "truth cm3", "volume err %", "centroid err mm", "diameter err mm"], rows)


def knee(quick: bool) -> None:
    try:
        from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom
    except ImportError:
        print("\n5. Knee phantom: bml_pipeline.synth.phantom not available, skipped")
        return
    rows, thick_rows = [], []
    for side in (["right"] if quick else ["right", "left"]):
        for name, spacing in (("0.7x0.3646x0.3646", (0.7, 0.3646, 0.3646)), ("1.5x0.3125x0.3125", (1.5, 0.3125, 0.3125))):
            ph = make_phantom(KneeSpec(side=side, pose=Pose((8.0, -6.0, 12.0), (3.0, -2.0, 1.0))), spacing=spacing)
            m = measure_labels(ph.labels, SCHEMA).to_dict()
            stripped = ph.labels.with_array(ph.labels.array, laterality=None)
            from bml_pipeline.measure import infer_side

            inferred = infer_side(stripped, SCHEMA)
            for bone in ("femur", "tibia"):
                truth = ph.truth.bml[bone]
                got = m["bml"][bone]["volume_cm3"]
                regions = [k for k, v in m["bml"][bone]["subregions"].items() if v["volume_cm3"] > 0.5 * got]
                rows.append([side, name, bone, f"{truth:.3f}", f"{100 * (got / truth - 1):+.3f}", ",".join(regions),
                             f"{m['side']} ({m['side_source']})", f"{inferred[0]} ({inferred[1]:.2f})"])
            for plate, truth in ph.truth.cartilage.items():
                got = m["cartilage"][plate]
                thick_rows.append([side, name, plate, f"{truth['mean_thickness_mm']:.3f}",
                                   f"{got['thickness_mm']['mean']:.3f}",
                                   f"{got['thickness_mm']['mean'] - truth['mean_thickness_mm']:+.3f}",
                                   f"{got['interface_area_mm2'] / truth['area_mm2']:.3f}"])
    table("5a. Knee phantom: BML volume error, dominant MOAKS subregion (truth: femur central_medial, "
          "tibia central_lateral), side from metadata and from anatomy alone",
          ["knee", "spacing (mm)", "bone", "truth cm3", "error %", "subregion", "side", "anatomy only"], rows)
    table("5b. Knee phantom cartilage: plates taper to zero over 4 mm; the truth averages over the whole\n"
          "    mathematical support, labels only show cartilage thicker than about half a voxel, so the\n"
          "    labelled interface (area ratio) is smaller and its mean thicker (see thickness.py docstring)",
          ["knee", "spacing (mm)", "plate", "truth mm", "ours mm", "error", "area ratio"], thick_rows)


def real_maps(count: int) -> None:
    """Real OAI label maps (no truth): mean thickness per plate, ours next to the smoothed labels alone,
    to show what the shape-based interpolation changes on sagittal knees."""
    from bml_pipeline.io import read_labels

    folder = Path(os.environ.get("BML_SHARED_DATA", REPO.parent / "shared" / "data")) / "oai_labels"
    paths = sorted(folder.glob("*_labels.nii.gz"))[1::9][:count]
    if not paths:
        print(f"\n6. Real label maps: none in {folder}, skipped")
        return
    smoothed_only = MeasureConfig(shape_interp_full_step_mm=0, shape_interp_cutoff_step_mm=0)
    rows = []
    for path in paths:
        labels = read_labels(path, SCHEMA)
        for plate in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage"):
            ours, smoothed = (cartilage_thickness(labels, SCHEMA, plate, config=config).stats
                              for config in (None, smoothed_only))
            if ours is None or smoothed is None:
                continue
            rows.append([path.name.split("_labels")[0], plate, f"{ours.mean:.3f}", f"{smoothed.mean:.3f}",
                         f"{ours.mean - smoothed.mean:+.3f}"])
    table("6. Real OAI label maps (no truth): mean thickness, ours and the smoothed labels alone (mm)",
          ["map", "plate", "ours", "smoothed", "difference"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--no-knee", action="store_true", help="skip the knee phantom")
    parser.add_argument("--real", type=int, default=4, metavar="N",
                        help="real OAI maps to compare with the smoothed labels alone (0: none)")
    args = parser.parse_args()
    start = time.perf_counter()
    flat_plates(args.quick)
    other_plates(args.quick)
    thickening(args.quick)
    small_tilt_spread(args.quick)
    lesions(args.quick)
    if not args.no_knee:
        knee(args.quick)
    if args.real > 0:
        real_maps(args.real)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
