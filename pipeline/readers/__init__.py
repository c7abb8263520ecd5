"""Reading images: `sources` opens any image as a `Source` of pixels by windows (the reader chosen by format and
options), `images` holds what every reader shares (confined paths, the pixel limit, 8-bit pixels, `ImageError`), and
one module per backend (docs/images.md says which reads what, and why): `formats` (the format from the first bytes,
sizes from headers), `vips` (libvips: JPEG, PNG, GIF, HEIF band by band), `tiff` (tifffile), `geo` (rasterio),
`slide` (OpenSlide), `remote` (fsspec) and `opencv` (WebP, BMP, PNM, HDR, Sun raster, JPEG 2000 and .npy, decoded
whole)."""
