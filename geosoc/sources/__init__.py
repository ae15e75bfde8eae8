"""Where covariates come from: lazy `Layer`s (layers) read from Earth Engine through xee (earthengine, ee_plan,
ee_fetch; credentials in ee_credentials), users' rasters (raster) or an offline procedural landscape (synthetic,
noise).
May import: io and the ground (catalog, grid, errors, threads)."""
