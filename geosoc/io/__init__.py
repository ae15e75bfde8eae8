"""Storage on any fsspec URL: reading, writing and publishing in one step (storage), one writer at a time
(locks), and resumable chunk-by-chunk builds (progress).
May import: catalog, grid, errors, threads (the ground). Nothing else in geosoc."""
