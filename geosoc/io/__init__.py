"""Storage on any fsspec URL: reading, writing and publishing in one step (storage), one writer at a time
(locks), resumable chunk-by-chunk builds (progress), and damaged chunks named (damaged_chunks).
May import: catalog, grid, errors, threads (the ground). Nothing else in geosoc."""
