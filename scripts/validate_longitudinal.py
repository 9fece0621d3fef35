"""Accuracy of the longitudinal stage on synthetic visit pairs with known change.

Each pair is the analytic knee phantom (:mod:`bml_pipeline.synth.phantom`) rasterized twice at OAI
spacing (0.7 x 0.365 x 0.365 mm; ``--spacing dess``: 0.3125 x 0.3125 x 1.5 mm, axial thick slices;
``--spacing sagittal_thick``: 1.5 x 0.3125 x 0.3125 mm):

- baseline: random pose (rotations up to +-5 deg, translations up to +-3 mm), femoral BML 3.0 cm3;
- follow-up: another random pose (up to +-10 deg, +-5 mm), femoral BML 0.9 cm3 (-2.1 cm3), femoral
  cartilage thickness x 1.024 (+2.4 %), and a field of view cut 12 mm lower at the top (the femoral
  shaft is cut elsewhere) while the baseline loses 8 mm of tibial shaft at the bottom.

``--route images`` goes through the segmentation stage: each phantom visit becomes a synthesized PD
fat-suppressed image (:func:`bml_pipeline.synth.image.synthesize`, a seed per visit), the shipped model
segments it (``--model``), optionally followed by the classical BML refinement (``--refine``), and the
change is computed on the predicted label maps. Printed per pair: the BML and thickness change and, for
reference, the bone and lesion Dice of each visit's prediction.

``--route real`` uses real OAI label maps instead (``../shared/data/oai_labels``, the 00m visits) with
:func:`bml_pipeline.synth.change.inject_change`: the *baseline* is the real map with its femoral BML grown
by 2.1 cm3 and its femoral cartilage thinned on the articular side by 1 - 1/1.024, repositioned by a
random rigid motion (+-10 deg, +-5 mm) and cut 10 mm at the top; the follow-up is the untouched real map.
So the change baseline -> follow-up is -2.1 cm3 and +2.4 % (truth from the achieved voxel counts). That
thickness truth is the plate's *volume* change: the thinning removes voxels in order of relative depth, so
thick columns lose one first and the thin rim none, and the interior over which the change stage measures
thins by more (it reads +2.8 to +3.2 %, BENCHMARKS.md); this route checks BML and alignment, not thickness.

``--route resampled`` measures the pose dependence on real anatomy: each real map (the 00m visits) is
made a continuous anatomy (every label's indicator smoothed by 0.35 mm) and rasterized again at two random
poses on its own grid (:mod:`bml_pipeline.synth.resample`); nothing else changes, so the truth is 0 for
the BML and every thickness change. Unlike ``--route real`` (which moves the grid with the anatomy), the
voxel grid cuts the anatomy differently at the two visits, as in the phantom route; ``--spacing`` rasterizes
both visits on a grid of that voxel size over the map's field of view. With ``--gain`` other than 1 the
follow-up's femoral articular surface is also moved out along the bone normals by a constant
``delta = (gain - 1) x`` the plate's mean thickness (``ArticularShift``), so the femoral cartilage
thickens by about ``delta`` mm wherever it covers the bone. The truth is traced, not assumed: the
baseline's rays over the common region are followed through the continuous anatomy with and without the
change, and the truth is their mean extra length over their mean measured baseline thickness (where the
cartilage is thinner than about a millimetre, the smoothed bone nudges the surface a little farther).
Where femoral and tibial cartilage touch, the tibial plate gives way (its change is no longer 0 there).

Phantom routes also print ``tilt b/f``: the angle between the phantom's femoral condyle axis (the condyles
are cylinders along it) and the nearest plane of each visit's voxel grid. Within about a degree of a grid
plane, every straight line of the cylinders runs at one height over that plane, so the label map's
staircase is the same all along the condyle, far fewer independent steps average out, and a pair's
femoral change can be off by 0.3-0.4 pp (BENCHMARKS.md, "Longitudinal"). The summary splits the error
RMS by that tilt.

The truth of the alignment is the rigid map baseline world -> follow-up world of the two poses. The
change is computed by :func:`bml_pipeline.longitudinal.change.compare_visits` on the label maps (measure
stage included). Printed per pair: recovered femoral BML change (truth -2.1 cm3), femoral thickness
change (truth +2.4 %), worst rotation error of femur and tibia (deg; the phantom patella is a lens whose
rotation about its axis is unobservable, shown apart), worst translation error over the bones (mm, at
each bone's epiphysis centroid) and the largest alignment residual. Targets: +-0.05 cm3,
+-0.3 percentage points, 0.5 deg, 0.5 mm.

Usage::

    .venv/bin/python scripts/validate_longitudinal.py [--pairs 3] [--seed 7] [--spacing oai|dess|sagittal_thick] [--json OUT]
        [--route phantom|real|resampled|images] [--gain 1.024]
    .venv/bin/python scripts/validate_longitudinal.py --pool RUN1.json RUN2.json ...   # pairs of several runs together
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import load_schema
from bml_pipeline.longitudinal.change import compare_visits
from bml_pipeline.longitudinal.transform import RigidTransform, rotation_difference_deg
from bml_pipeline.synth.change import cut_field_of_view as cut
from bml_pipeline.synth.phantom import DEFAULT_LESIONS, KneeSpec, Pose, make_phantom
from bml_pipeline.synth.resample import ArticularShift, grid_with_spacing, resample_smoothly, thickening_along
from bml_pipeline.volume import Volume

REPO = Path(__file__).resolve().parents[1]
# oai: sagittal 0.7 mm slices; dess: 1.5 mm slices across the S-I axis (axial: the articular surfaces of the
# distal femur and the plateau lie nearly in the slices); sagittal_thick: clinical sagittal 1.5 mm slices.
SPACINGS = {"oai": (0.7, 0.3646, 0.3646), "dess": (0.3125, 0.3125, 1.5), "sagittal_thick": (1.5, 0.3125, 0.3125),
            "sagittal_3mm": (3.0, 0.3125, 0.3125)}
BASE_FEMORAL_BML_CM3 = 3.0
BML_CHANGE_CM3 = -2.1
THICKNESS_GAIN = 1.024
# The phantom's patella is a lens (two spheres centred on one line): turning it about that line changes
# nothing, so its rotation is unobservable from its shape; it is reported, not checked.
CHECKED_BONES = ("femur", "tibia")
TILT_SPLIT_DEG = 0.5  # the summary's split of the phantom pairs by condyle axis tilt
TARGETS = {"bml_cm3": 0.05, "thickness_pp": 0.3, "rotation_deg": 0.5, "translation_mm": 0.5}


def make_pair(rng: np.random.Generator, spacing: tuple[float, float, float], gain: float = THICKNESS_GAIN):
    """(baseline phantom, follow-up phantom, true baseline->follow-up transform)."""
    femoral, tibial = DEFAULT_LESIONS
    base_spec = KneeSpec(pose=Pose.random(rng, 5.0, 3.0), lesions=(replace(femoral, volume_cm3=BASE_FEMORAL_BML_CM3), tibial))
    foll_spec = KneeSpec(pose=Pose.random(rng, 10.0, 5.0),
                         lesions=(replace(femoral, volume_cm3=BASE_FEMORAL_BML_CM3 + BML_CHANGE_CM3), tibial),
                         thickness_scale=(("femoral_cartilage", gain),))
    base = make_phantom(base_spec, spacing=spacing)
    foll = make_phantom(foll_spec, spacing=spacing)
    truth = RigidTransform(foll_spec.world_from_local() @ np.linalg.inv(base_spec.world_from_local()))
    return base, foll, truth


def make_real_pair(rng: np.random.Generator, path: Path):
    """(baseline, follow-up, truth transform, true femoral BML delta cm3, true thickness delta %) from a
    real label map with injected change (see module docstring)."""
    from bml_pipeline.io import read_labels
    from bml_pipeline.synth.change import inject_change

    schema = load_schema("oai_zib")
    original = read_labels(path, schema)
    pose = Pose.random(rng, 10.0, 5.0)
    centre = original.world_coords((np.asarray(original.shape) - 1) / 2.0)
    motion = pose.matrix()
    motion[:3, 3] += centre - motion[:3, :3] @ centre  # rotate about the field of view's centre
    grown, truth = inject_change(original, schema, bml_change_cm3={"femur": -BML_CHANGE_CM3},
                                 thickness_change_percent={"femoral_cartilage": 100.0 * (1.0 / THICKNESS_GAIN - 1.0)},
                                 reposition=motion, seed=int(rng.integers(1 << 30)))
    plate = truth["cartilage"]["femoral_cartilage"]
    thickness_pct = 100.0 * (plate["baseline_cm3"] / plate["followup_cm3"] - 1.0)
    bml_delta = -truth["bml"]["femur"]["delta_cm3"]
    baseline = cut(grown, 2, 10.0, 0.0)
    return baseline, original, RigidTransform(np.linalg.inv(motion)), bml_delta, thickness_pct


def make_resampled_pair(rng: np.random.Generator, path: Path, gain: float = 1.0,
                        spacing: tuple[float, float, float] | None = None):
    """(baseline, follow-up, truth transform, true femoral thickness change %): one real label map's
    anatomy, made continuous by :func:`resample_smoothly`, at two random poses on the same grid (rotations
    about the field of view's centre up to +-5 / +-10 deg, translations up to +-3 / +-5 mm). With ``gain`` 1
    nothing changes but the pose; otherwise the follow-up's femoral articular surface moves out along the
    bone normals by ``(gain - 1) x`` the plate's mean thickness (``ArticularShift``), and the truth is that
    thickening along the baseline's own rays over the common region, traced in the continuous anatomy
    (:func:`region_thickening_percent`). ``spacing``: both visits rasterized on a grid of this voxel size
    over the map's field of view (default: the map's own grid)."""
    from bml_pipeline.io import read_labels
    from bml_pipeline.measure import cartilage_thickness

    schema = load_schema("oai_zib")
    original = read_labels(path, schema)
    centre = original.world_coords((np.asarray(original.shape) - 1) / 2.0)
    motions = []
    for rotation, translation in ((5.0, 3.0), (10.0, 5.0)):
        motion = Pose.random(rng, rotation, translation).matrix()
        motion[:3, 3] += centre - motion[:3, :3] @ centre
        motions.append(motion)
    truth = RigidTransform(motions[1] @ np.linalg.inv(motions[0]))
    grid = grid_with_spacing(original, spacing) if spacing is not None else None
    base = resample_smoothly(original, motions[0], grid=grid)
    if gain == 1.0:
        return base, resample_smoothly(original, motions[1], grid=grid), truth, 0.0
    shift = (gain - 1.0) * cartilage_thickness(original, schema, "femoral_cartilage").stats.mean
    change = ArticularShift.build(original, schema, "femoral_cartilage", shift)
    foll = resample_smoothly(original, motions[1], change=change, grid=grid)
    return base, foll, truth, region_thickening_percent(original, change, base, foll, truth, motions[0])


def region_thickening_percent(original: Volume, change: ArticularShift, baseline: Volume, followup: Volume,
                              truth: RigidTransform, base_motion: np.ndarray) -> float:
    """True femoral thickness change (%) over the common region: the baseline's rays there (as the change
    stage selects them, with the true transform) traced back into the continuous anatomy of ``original``,
    where :func:`thickening_along` says how much farther each leaves the plate with ``change``; relative
    to the rays' measured baseline thickness."""
    from bml_pipeline.longitudinal.change import ChangeConfig, CommonInterface
    from bml_pipeline.measure import cartilage_thickness

    schema = load_schema("oai_zib")
    rays = cartilage_thickness(baseline, schema, "femoral_cartilage")
    region = CommonInterface.build(baseline, followup, schema, "femoral_cartilage", truth, ChangeConfig())
    select = region.contains(rays.points_mm)
    back = np.linalg.inv(base_motion)
    grown = thickening_along(original, change, rays.points_mm[select] @ back[:3, :3].T + back[:3, 3],
                             rays.normals[select] @ back[:3, :3].T,
                             max_mm=float(rays.thickness_mm[select].max(initial=0.0)) + 2.0)
    traced = np.isfinite(grown)
    weights = rays.areas_mm2[select][traced]
    return float(100.0 * np.sum(weights * grown[traced]) / np.sum(weights * rays.thickness_mm[select][traced]))


def tilt(result: dict) -> str:
    """The condyle axis tilt of both visits (deg), phantom routes; n/a otherwise."""
    if "condyle_axis_tilt_deg" not in result:
        return "n/a"
    return "/".join(f"{t:.1f}" for t in result["condyle_axis_tilt_deg"])


def minus(value: float | None, truth: float) -> float | None:
    return None if value is None else value - truth


def num(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or n/a (same width) when it is None."""
    if value is None:
        width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
        return "n/a".rjust(width)
    return format(value, spec)


def condyle_axis_tilt_deg(phantom) -> float:
    """Angle (deg) between the phantom's femoral condyle axis (its local x: the condyles are cylinders
    along it) and the nearest plane of its voxel grid. Near 0 every straight line of the cylinders runs
    at one constant height over that plane, so the staircase of the label map is the same all along the
    condyle, and its error averages over far fewer independent steps."""
    axis = phantom.spec.world_from_local()[:3, :3] @ np.array([1.0, 0.0, 0.0])
    sin = np.abs(phantom.labels.direction.T @ (axis / np.linalg.norm(axis)))
    return float(np.degrees(np.arcsin(np.clip(sin.min(), 0.0, 1.0))))


def evaluate(baseline: Volume, followup: Volume, truth: RigidTransform, bml_truth: float = BML_CHANGE_CM3,
             thickness_truth: float = 100.0 * (THICKNESS_GAIN - 1.0), force: bool = False) -> dict[str, float]:
    """The change between the visits against the truth."""
    schema = load_schema("oai_zib")
    change = compare_visits(baseline, followup, schema, force=force)
    d = change.to_dict()
    femur_bml = d["bml"]["femur"]
    fc = d["cartilage"]["femoral_cartilage"]
    rot = {bone: rotation_difference_deg(a.transform, truth) for bone, a in change.alignment.items()}
    trans = {bone: float(np.linalg.norm(a.transform.apply(a.centre_mm) - truth.apply(a.centre_mm)))
             for bone, a in change.alignment.items()}
    return {
        "bml_femur_delta_cm3": femur_bml["delta_cm3"],
        "bml_true_delta_cm3": bml_truth,
        "bml_error_cm3": minus(femur_bml["delta_cm3"], bml_truth),
        "thickness_delta_percent": fc["delta_percent"],
        "thickness_true_delta_percent": thickness_truth,
        "thickness_error_pp": minus(fc["delta_percent"], thickness_truth),
        "tibial_thickness_delta_percent": d["cartilage"]["tibial_cartilage"]["delta_percent"],
        "rotation_true_deg": truth.rotation_deg,
        "rotation_error_deg": max(rot[b] for b in CHECKED_BONES),
        "translation_error_mm": max(trans.values()),
        "rotation_error_patella_deg": rot.get("patella"),
        "residual_max_mm": max(a.residual_mm for a in change.alignment.values()),
        "lesions": {s: d["bml"]["femur"]["lesions"][s]["count"] for s in ("persisting", "new", "resolved")},
    }


def segmented(predictor, labels: Volume, seed: int, refine: bool) -> tuple[Volume, dict[str, float]]:
    """Predicted labels of a PD-FS image synthesized from ``labels``, and their Dice per structure."""
    from bml_pipeline.segment.bml import refine_lesions
    from bml_pipeline.segment.metrics import dice_per_label
    from bml_pipeline.synth.image import synthesize

    schema = load_schema("oai_zib")
    synthesis = synthesize(labels, schema, preset="pd_fs", seed=seed)
    predicted = predictor.segment(synthesis.image)
    if refine:
        predicted = refine_lesions(synthesis.image, predicted, schema, predictor.config.bml_refine, "pd_fs")
    dice = dice_per_label(predicted.array, synthesis.labels.array, [1, 3, 7])
    return predicted, {"femur": dice[1], "tibia": dice[3], "femoral_bml": dice[7]}


def summarize(results: list[dict], rule_width: int = 80) -> tuple[bool, dict[str, float]]:
    """Print the error summary of ``results`` (the per-pair dicts of :func:`evaluate`) against the targets;
    return (all targets met, worst absolute error per target)."""
    # A change that could not be measured (None: e.g. no lesion predicted at either visit) counts as failed.
    worst = {
        "bml_cm3": max(abs(r["bml_error_cm3"]) if r["bml_error_cm3"] is not None else np.inf for r in results),
        "thickness_pp": max(abs(r["thickness_error_pp"]) if r["thickness_error_pp"] is not None else np.inf
                            for r in results),
        "rotation_deg": max(r["rotation_error_deg"] for r in results),
        "translation_mm": max(r["translation_error_mm"] for r in results),
    }
    print("-" * rule_width)
    errors = np.array([r["thickness_error_pp"] for r in results if r["thickness_error_pp"] is not None])
    if errors.size:
        within = int(np.sum(np.abs(errors) <= TARGETS["thickness_pp"]))
        sd = errors.std(ddof=1) if errors.size > 1 else 0.0
        print(f"thickness change error: RMS {np.sqrt(np.mean(errors ** 2)):.3f} pp, mean {errors.mean():+.3f} pp, "
              f"SD {sd:.3f} pp, 95 % limits of agreement {errors.mean() - 1.96 * sd:+.3f} to "
              f"{errors.mean() + 1.96 * sd:+.3f} pp; {within} of {len(results)} pairs within "
              f"+-{TARGETS['thickness_pp']} pp")
        tilted = [(min(r["condyle_axis_tilt_deg"]) < TILT_SPLIT_DEG, r["thickness_error_pp"]) for r in results
                  if "condyle_axis_tilt_deg" in r and r["thickness_error_pp"] is not None]
        for near, name in ((True, "a visit's condyle axis within"), (False, "both condyle axes farther than")):
            part = np.array([e for t, e in tilted if t == near])
            if part.size:
                print(f"  pairs with {name} {TILT_SPLIT_DEG} deg of a grid plane: "
                      f"{part.size}, RMS {np.sqrt(np.mean(part ** 2)):.3f} pp, worst {np.abs(part).max():.3f}")
    ok = True
    for key, limit in TARGETS.items():
        passed = worst[key] <= limit
        ok &= passed
        print(f"worst |error| {key:<15} {worst[key]:.4f}  (target {limit})  {'PASS' if passed else 'FAIL'}")
    return ok, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="accuracy of the longitudinal stage on synthetic pairs")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--spacing", choices=sorted(SPACINGS), default="oai")
    parser.add_argument("--route", choices=("phantom", "real", "resampled", "images"), default="phantom",
                        help="analytic phantom pairs, real OAI label maps with injected change, real maps "
                             "re-rasterized at two poses without change, or phantom pairs as synthesized "
                             "images through the segmentation stage")
    parser.add_argument("--gain", type=float, default=None,
                        help=f"femoral thickness factor at follow-up (default {THICKNESS_GAIN}; route resampled: 1.0); "
                             "1.0: pose dependence alone")
    parser.add_argument("--model", default="knee_synth_v1", help="segmentation model (route images)")
    parser.add_argument("--refine", action="store_true", help="classical BML refinement (route images)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "oai_labels"))
    parser.add_argument("--json", help="write the per-pair results here")
    parser.add_argument("--pool", nargs="+", metavar="JSON",
                        help="no new pairs: summarize the pairs of these --json outputs together")
    args = parser.parse_args(argv)
    if args.pool:
        runs = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.pool]
        print("pooled: " + ", ".join(f"{path} (spacing {run['spacing']}, seed {run['seed']}, "
                                     f"{len(run['pairs'])} pairs)" for path, run in zip(args.pool, runs)))
        return 0 if summarize([pair for run in runs for pair in run["pairs"]])[0] else 1
    if args.gain is None:
        args.gain = 1.0 if args.route == "resampled" else THICKNESS_GAIN
    rng = np.random.default_rng(args.seed)
    paths = sorted(Path(args.data).glob("akoa_*_00m_labels.nii.gz"))[: args.pairs]
    if args.route in ("real", "resampled") and len(paths) < args.pairs:
        print(f"only {len(paths)} baseline maps in {args.data}", file=sys.stderr)
        return 2
    results = []
    head = (f"{'pair':>4} {'rot (deg)':>9} {'BML d (cm3)':>11} {'err':>7} {'thick d (%)':>11} {'err (pp)':>8} "
            f"{'tib d (%)':>9} {'rot err':>8} {'pat rot':>8} {'trans err':>9} {'resid':>6} {'lesions p/n/r':>13} "
            f"{'tilt b/f':>9} {'time':>6}")
    grid = {"real": "real OAI label maps (0.7 x 0.365 x 0.365 mm)",
            "resampled": "real OAI label maps re-rasterized at two poses "
                         f"({' x '.join(f'{v:g}' for v in SPACINGS[args.spacing])} mm)"}.get(
        args.route, f"phantom, spacing {SPACINGS[args.spacing]} mm")
    if args.route == "resampled" and args.gain == 1.0:
        print(f"{grid}; truth: no change (BML 0 cm3, thickness 0 %)")
    elif args.route == "resampled":
        print(f"{grid}; truth: BML 0 cm3, femoral cartilage thickened by {100 * (args.gain - 1):.1f} % of its "
              "mean thickness (the region's traced truth per pair in the JSON)")
    else:
        print(f"{grid}; truth: BML {BML_CHANGE_CM3:+.2f} cm3, thickness {100 * (args.gain - 1):+.1f} % (phantom "
              "routes), tibial thickness 0 %")
    print(head)
    print("-" * len(head))
    predictor = None
    if args.route == "images":
        from bml_pipeline.segment.predictor import Predictor

        predictor = Predictor.load(args.model, device="cpu")
    for i in range(args.pairs):
        start = time.perf_counter()
        if args.route == "images":
            base, foll, truth = make_pair(rng, SPACINGS[args.spacing], args.gain)
            (b, dice_b), (f, dice_f) = (segmented(predictor, v.labels, 100 + 2 * i + k, args.refine)
                                        for k, v in enumerate((base, foll)))
            try:
                # Forced: predicted bones may fail the same-knee check; the change is reported anyway.
                r = evaluate(b, f, truth, thickness_truth=100.0 * (args.gain - 1.0), force=True)
            except InputError as error:
                print(f"{i:>4} failed: {error}", flush=True)
                continue
            r["dice"] = {"baseline": dice_b, "followup": dice_f}
            r["condyle_axis_tilt_deg"] = [condyle_axis_tilt_deg(v) for v in (base, foll)]
            print(f"     Dice baseline {dice_b}, follow-up {dice_f}", flush=True)
        elif args.route == "resampled":
            spacing = None if args.spacing == "oai" else SPACINGS[args.spacing]
            baseline, followup, truth, thickness_truth = make_resampled_pair(rng, paths[i], args.gain, spacing)
            r = evaluate(baseline, followup, truth, bml_truth=0.0, thickness_truth=thickness_truth)
            r["source"] = paths[i].name
        elif args.route == "real":
            baseline, followup, truth, bml_truth, thickness_truth = make_real_pair(rng, paths[i])
            r = evaluate(baseline, followup, truth, bml_truth, thickness_truth)
            r["source"] = paths[i].name
        else:
            base, foll, truth = make_pair(rng, SPACINGS[args.spacing], args.gain)
            r = evaluate(cut(base.labels, 2, 0.0, 8.0), cut(foll.labels, 2, 12.0, 0.0), truth,
                         thickness_truth=100.0 * (args.gain - 1.0))
            r["condyle_axis_tilt_deg"] = [condyle_axis_tilt_deg(v) for v in (base, foll)]
        r["seconds"] = time.perf_counter() - start
        results.append(r)
        les = r["lesions"]
        print(f"{i:>4} {r['rotation_true_deg']:>9.2f} {num(r['bml_femur_delta_cm3'], '>11.4f')} "
              f"{num(r['bml_error_cm3'], '>+7.4f')} {num(r['thickness_delta_percent'], '>11.3f')} "
              f"{num(r['thickness_error_pp'], '>+8.3f')} {num(r['tibial_thickness_delta_percent'], '>+9.3f')} "
              f"{num(r['rotation_error_deg'], '>8.3f')} {num(r['rotation_error_patella_deg'], '>8.2f')} "
              f"{num(r['translation_error_mm'], '>9.3f')} {num(r['residual_max_mm'], '>6.3f')} "
              f"{les['persisting']:>5}/{les['new']}/{les['resolved']:<5} {tilt(r):>9} {r['seconds']:>5.0f}s", flush=True)
    if not results:
        print("no pair could be evaluated")
        return 1
    ok, worst = summarize(results, rule_width=len(head))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"spacing": args.spacing, "seed": args.seed, "pairs": results, "worst": worst}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
