"""Regenerate ``sample_data/``: one phantom right knee at visits 00m and 12m (deterministic).

The follow-up loses 2.1 cm3 of femoral BML, gains 2.4 % femoral cartilage thickness and is repositioned
(rotation of a few degrees, a few mm of translation). Spacing 1.0 x 0.5 x 0.5 mm (sagittal 1 mm slices;
the realistic 0.7 x 0.365 x 0.365 mm grid makes the noisy images too large for the repository),
DESS-like images stored as int16 (a fifth of the synthesizer's units, to compress), labels as uint16, both gzip-compressed, and a batch manifest.

Usage: python scripts/make_sample_data.py [--out sample_data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from bml_pipeline.synth.pair import phantom_visits, write_visits
    from bml_pipeline.synth.phantom import KneeSpec, Pose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "sample_data"))
    args = parser.parse_args()
    baseline = KneeSpec(side="right", pose=Pose((3.0, -4.0, 2.0), (0.0, 0.0, 0.0)))
    visits = phantom_visits(baseline, bml_change_cm3={"femur": -2.1},
                            thickness_change_percent={"femoral_cartilage": 2.4},
                            followup_pose=Pose((-2.0, 3.5, 6.0), (2.5, -3.0, 4.0)),
                            spacing=(1.0, 0.5, 0.5), preset="dess", snr=30.0, seed=12)
    for path in write_visits(args.out, "phantom01", visits, image_scale=0.2):
        print(f"wrote {path.relative_to(Path(args.out).resolve().parent) if path.is_absolute() else path}")
    change = visits[1].truth["change"]
    print(f"femoral BML {change['bml']['femur']['baseline_cm3']:.4f} -> {change['bml']['femur']['followup_cm3']:.4f} cm3; "
          f"femoral cartilage {change['cartilage']['femoral_cartilage']['delta_percent']:+.4f} %")


if __name__ == "__main__":
    main()
