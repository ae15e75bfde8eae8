"""Data a model sees: the covariate cube (cube), soil point tables (points), SampleSets cut from the cube or made
from outside tables (sampling, tables) and streamed as training batches (streaming); the Edgeroi survey (edgeroi/).
May import: sources, io, stats and the ground (catalog, grid, errors, threads)."""
