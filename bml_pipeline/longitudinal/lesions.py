"""Matching bone marrow lesions across two visits of one knee.

Each visit's lesions are the connected components of the bone's lesion label (components below
``min_volume_mm3`` are noise, as in the measure stage). The follow-up components are pulled onto the
baseline grid through the bone's rigid alignment (nearest neighbour); a baseline and a follow-up lesion
are linked when they overlap there or their centroids lie within ``max_centroid_mm`` of each other.
Linked lesions form groups (a lesion that split or merged stays one group):

- ``persisting``: lesions at both visits;
- ``resolved``: baseline lesions with no follow-up partner;
- ``new``: follow-up lesions with no baseline partner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bml_pipeline.longitudinal.transform import RigidTransform, pull_to_grid
from bml_pipeline.volume import Volume, bounding_box

STATUSES = ("persisting", "new", "resolved")


@dataclass(frozen=True)
class LesionGroup:
    """Linked lesions of one bone. Volumes in cm3; centroid in baseline world RAS mm."""

    status: str
    baseline_cm3: float
    followup_cm3: float
    baseline_count: int
    followup_count: int
    centroid_mm: tuple[float, float, float]

    @property
    def delta_cm3(self) -> float:
        return self.followup_cm3 - self.baseline_cm3

    def to_dict(self, decimals: int = 6) -> dict[str, Any]:
        return {"status": self.status, "baseline_cm3": round(self.baseline_cm3, decimals),
                "followup_cm3": round(self.followup_cm3, decimals), "delta_cm3": round(self.delta_cm3, decimals),
                "baseline_count": self.baseline_count, "followup_count": self.followup_count,
                "centroid_mm": [round(v, 3) for v in self.centroid_mm]}


@dataclass(frozen=True)
class _Components:
    labels: np.ndarray        # int32 component ids (0 = none) on the visit's grid
    volumes_mm3: np.ndarray   # (n,) volume of component id i+1
    centroids_mm: np.ndarray  # (n, 3) RAS mm


def match_lesions(baseline: Volume, followup: Volume, lesion_id: int, transform: RigidTransform, *,
                  min_volume_mm3: float = 0.5, connectivity: int = 3,
                  max_centroid_mm: float = 5.0) -> tuple[LesionGroup, ...]:
    """Groups of linked lesions of label ``lesion_id`` between two visits.

    Args:
        baseline, followup: label maps of the two visits (any grids).
        lesion_id: label value of the bone's lesions.
        transform: the bone's alignment, baseline world (RAS mm) -> follow-up world.
        min_volume_mm3: connected components smaller than this are ignored.
        connectivity: 1, 2 or 3 (faces / + edges / + corners) for grouping voxels into lesions.
        max_centroid_mm: lesions whose centroids (in baseline space) are this close are linked even
            without overlap.

    Returns:
        Groups sorted by status (persisting, new, resolved), then by decreasing total volume.
    """
    base = _components(baseline, lesion_id, min_volume_mm3, connectivity)
    foll = _components(followup, lesion_id, min_volume_mm3, connectivity)
    nb, nf = len(base.volumes_mm3), len(foll.volumes_mm3)
    links = np.zeros((nb, nf), dtype=bool)
    foll_centroids = transform.inverse().apply(foll.centroids_mm) if nf else np.zeros((0, 3))
    if nb and nf:
        mapped = pull_to_grid(followup.with_array(foll.labels), transform.inverse(), baseline, order=0)
        both = (base.labels > 0) & (mapped > 0)
        pairs = np.unique(np.stack([base.labels[both], mapped[both]], axis=1), axis=0)
        links[pairs[:, 0] - 1, pairs[:, 1] - 1] = True
        dist = np.linalg.norm(base.centroids_mm[:, None, :] - foll_centroids[None, :, :], axis=2)
        links |= dist <= max_centroid_mm
    groups = []
    for bi, fi in _linked_sets(links):
        vb = float(base.volumes_mm3[bi].sum())
        vf = float(foll.volumes_mm3[fi].sum())
        weights = np.concatenate([base.volumes_mm3[bi], foll.volumes_mm3[fi]])
        points = np.concatenate([base.centroids_mm[bi], foll_centroids[fi]])
        centroid = tuple(float(v) for v in (points * weights[:, None]).sum(axis=0) / weights.sum())
        status = "persisting" if len(bi) and len(fi) else "resolved" if len(bi) else "new"
        groups.append(LesionGroup(status, vb / 1000.0, vf / 1000.0, len(bi), len(fi), centroid))
    return tuple(sorted(groups, key=lambda g: (STATUSES.index(g.status), -(g.baseline_cm3 + g.followup_cm3),
                                               g.centroid_mm)))


def summarize_groups(groups: tuple[LesionGroup, ...], decimals: int = 6) -> dict[str, Any]:
    """Counts and volumes (cm3) per status, and the groups themselves, JSON-ready."""
    out: dict[str, Any] = {}
    for status in STATUSES:
        members = [g for g in groups if g.status == status]
        out[status] = {"count": len(members),
                       "baseline_cm3": round(float(sum(g.baseline_cm3 for g in members)), decimals),
                       "followup_cm3": round(float(sum(g.followup_cm3 for g in members)), decimals)}
    out["groups"] = [g.to_dict(decimals) for g in groups]
    return out


def _components(labels: Volume, lesion_id: int, min_volume_mm3: float, connectivity: int) -> _Components:
    from scipy import ndimage

    full = np.zeros(labels.shape, dtype=np.int32)
    mask = labels.array == lesion_id
    box = bounding_box(mask)  # labelling only the lesions' box: a few % of the grid
    if box is None:
        return _Components(full, np.zeros(0), np.zeros((0, 3)))
    mask = mask[box]
    comp, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, connectivity))
    counts = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    volumes = counts * labels.voxel_volume_mm3
    keep = volumes >= min_volume_mm3
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    index = np.flatnonzero(keep) + 1
    centres = np.array(ndimage.center_of_mass(mask, comp, index)).reshape(-1, 3) + [s.start for s in box]
    full[box] = relabel[comp]
    return _Components(full, volumes[keep], labels.world_coords(centres))


def _linked_sets(links: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Connected components of the bipartite graph ``links`` (baseline x follow-up) as index arrays."""
    from scipy.sparse import bmat, csr_matrix
    from scipy.sparse.csgraph import connected_components

    nb, nf = links.shape
    if nb + nf == 0:
        return []
    adj = csr_matrix(links.astype(np.int8))
    graph = bmat([[None, adj], [adj.T, None]]) if nb and nf else csr_matrix((nb + nf, nb + nf))
    _, membership = connected_components(graph, directed=False)
    sets = []
    for group in np.unique(membership):
        members = np.flatnonzero(membership == group)
        sets.append((members[members < nb], members[members >= nb] - nb))
    return sets
