"""Known-truth test bed: analytic phantoms, image synthesis from label maps, injected changes.

- :mod:`~bml_pipeline.synth.phantom`: ``make_phantom(KneeSpec(...), shape, affine)`` -> labels + truth
  (geometry in :mod:`~bml_pipeline.synth.anatomy`, plates in :mod:`~bml_pipeline.synth.shells`,
  primitives in :mod:`~bml_pipeline.synth.sdf`, rasterization in :mod:`~bml_pipeline.synth.raster`).
- :mod:`~bml_pipeline.synth.image`: ``synthesize(labels, schema, preset, seed, ...)`` and
  ``synthesize_patch`` (random fields in :mod:`~bml_pipeline.synth.fields`).
- :mod:`~bml_pipeline.synth.change`: ``phantom_followup`` (analytic) and ``inject_change`` (any label map).
- :mod:`~bml_pipeline.synth.pair`: two phantom visits with images, truth and a batch manifest on disk.
"""
