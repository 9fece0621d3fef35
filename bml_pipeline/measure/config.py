"""Configuration of the measure stage: a frozen dataclass, loadable from the ``measure:`` section of a
YAML file (``configs/default.yaml``). Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bml_pipeline.errors import InputError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


@dataclass(frozen=True)
class MeasureConfig:
    """Parameters of volumetry, lesion analysis and cartilage thickness (lengths in mm).

    Attributes:
        min_lesion_volume_mm3: connected lesions smaller than this are treated as segmentation noise:
            left out of counts, volumes and subregion grades (reported as ``ignored_volume_cm3``).
            0.5 mm3 is 5 voxels at 0.7 x 0.365 x 0.365 mm and 3.4 voxels at 0.3125 x 0.3125 x 1.5 mm,
            and is stated in mm3 so the rule does not change with the acquisition's spacing.
        lesion_connectivity: 1 (faces), 2 (faces + edges) or 3 (faces + edges + corners) when
            grouping lesion voxels into connected lesions.
        surface_sigma_voxels: Gaussian smoothing (in voxels, per array axis) of the bone and
            bone+cartilage indicators before their 0.5 iso-surfaces are located sub-voxel.
        normal_sigma_mm: Gaussian smoothing (mm, isotropic in physical space) of the bone indicator
            whose gradient gives the interface normals along which thickness is measured.
        max_exit_angle_deg: a ray counts only when the surface it leaves through is within this angle of
            perpendicular to it; rays that leave through a plate's side (a steep edge) are dropped.
        hole_closing_voxels: the interface is closed (morphologically, on the bone surface) with a
            ball of this many times the largest voxel dimension, so thin plates that vanished from some
            voxel columns count there with zero thickness (0 turns this off).
        edge_erosion_voxels: interface points nearer than this many times the largest voxel dimension
            to the interface's outer edge are left out of the thickness statistics (rays there leave
            through the plate's side or start under a voxel tooth of its edge; 0 turns this off).
        shape_interp_full_step_mm, shape_interp_cutoff_step_mm: where a surface meets the slices at a
            small tilt, the label map is a staircase whose steps are ``slice spacing / tan(tilt)`` mm
            long. Up to ``shape_interp_full_step_mm`` the thickness is measured on the shape-based
            interpolation of the slices (their in-plane signed distance, linear across slices), beyond
            ``shape_interp_cutoff_step_mm`` on the smoothed labels, linearly blended in between (see
            thickness.py; a cutoff of 0 turns shape-based interpolation off).
        max_thickness_mm: rays from the bone interface stop searching for the articular surface here.
        ray_step_mm: sampling step along the rays before the crossing is refined by interpolation.
        decimals: measurements are rounded to this many decimals so repeated runs are byte-identical.
    """

    min_lesion_volume_mm3: float = 0.5
    lesion_connectivity: int = 3
    surface_sigma_voxels: float = 0.6
    normal_sigma_mm: float = 1.5
    max_exit_angle_deg: float = 45.0
    hole_closing_voxels: float = 1.0
    edge_erosion_voxels: float = 0.75
    shape_interp_full_step_mm: float = 8.0
    shape_interp_cutoff_step_mm: float = 12.0
    max_thickness_mm: float = 10.0
    ray_step_mm: float = 0.1
    decimals: int = 6

    def __post_init__(self) -> None:
        if self.min_lesion_volume_mm3 < 0:
            raise ValueError("min_lesion_volume_mm3 must be >= 0")
        if self.lesion_connectivity not in (1, 2, 3):
            raise ValueError("lesion_connectivity must be 1, 2 or 3")
        if self.surface_sigma_voxels < 0 or self.normal_sigma_mm <= 0:
            raise ValueError("surface_sigma_voxels must be >= 0 and normal_sigma_mm > 0")
        if not 0 < self.max_exit_angle_deg <= 90:
            raise ValueError("max_exit_angle_deg must be in (0, 90]")
        if self.hole_closing_voxels < 0 or self.edge_erosion_voxels < 0:
            raise ValueError("hole_closing_voxels and edge_erosion_voxels must be >= 0")
        if not 0 <= self.shape_interp_full_step_mm <= self.shape_interp_cutoff_step_mm:
            raise ValueError("need 0 <= shape_interp_full_step_mm <= shape_interp_cutoff_step_mm")
        if self.max_thickness_mm <= 0 or self.ray_step_mm <= 0:
            raise ValueError("max_thickness_mm and ray_step_mm must be > 0")
        if not 0 <= self.decimals <= 12:
            raise ValueError("decimals must be in 0..12")

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path | None = None) -> MeasureConfig:
        """Build from a mapping; unknown keys or bad values raise :class:`InputError` naming ``source``."""
        if not isinstance(values, dict):
            raise InputError(source, "the 'measure' section must be a mapping")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(source, f"unknown keys in the 'measure' section: {unknown} (known: {sorted(known)})")
        converted: dict[str, Any] = {}
        for key, value in values.items():
            kind = int if known[key].type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(source, f"measure.{key} must be a number, got {value!r}")
            if kind is int and value != int(value):
                raise InputError(source, f"measure.{key} must be an integer, got {value!r}")
            converted[key] = kind(value)
        try:
            return cls(**converted)
        except ValueError as exc:
            raise InputError(source, str(exc)) from None


def load_measure_config(path: str | Path | None = None) -> MeasureConfig:
    """The ``measure:`` section of a YAML config file (default: the packaged ``configs/default.yaml``).

    A file without a ``measure`` section gives the defaults; other top-level sections belong to other
    stages and are not read here.
    """
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(path, f"config is not valid YAML ({exc.__class__.__name__})") from None
    if raw is None:
        return MeasureConfig()
    if not isinstance(raw, dict):
        raise InputError(path, "config must be a mapping of sections")
    return MeasureConfig.from_dict(raw.get("measure") or {}, path)
