"""One module per backend that reads pixels, behind `pipeline.sources.open_source` (docs/images.md says which
reads what, and why): `formats` (the format from the first bytes, sizes from headers), `vips` (libvips: JPEG, PNG,
GIF, HEIF band by band), `tiff` (tifffile), `geo` (rasterio), `slide` (OpenSlide), `remote` (fsspec) and `opencv`
(WebP, BMP, PNM, HDR, Sun raster, JPEG 2000 and .npy, decoded whole)."""
