"""Statistics shared by training, evaluation and maps: scores (metrics), conformal intervals (calibration) and
the area of applicability (aoa). Plain NumPy and scikit-learn.
May import: the ground (errors) only."""
