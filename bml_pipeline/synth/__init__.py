"""Known-truth test bed: analytic phantoms, image synthesis from label maps, injected changes."""
