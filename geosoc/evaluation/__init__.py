"""`geosoc evaluate`: every model on the same spatial folds, scored and tabled (campaign).
May import: learn, data, sources, io, stats and the ground."""
