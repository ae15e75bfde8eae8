"""Models and how they learn: SSL-SoilNet (models/), its training loops (training) on one device or Ray Train
(distributed), checkpoints (checkpoint, normalisation), and the tree models (baselines).
May import: data, sources, io, stats and the ground (catalog, grid, errors, threads)."""
