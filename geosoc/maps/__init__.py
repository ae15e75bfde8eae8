"""Maps from a cube and a model: windows, predictors and the local and Ray engines (inference), tree models as
map models (tabular), and the exports any GIS reads: COG, PNG, STAC (export).
May import: learn, data, sources, io, stats and the ground."""
