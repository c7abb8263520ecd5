"""Reading images, one way: `inputs` says what an input is (where it lives, its format from the first bytes, a size
and a truncation from its header and ends: an `Input`), `sources` opens it by the one reader chosen for it as a
`Source` of pixels by windows, and `images` holds what every reader shares (confined paths, the pixel limit, 8-bit
pixels, `ImageError`). One module per backend (docs/images.md says which reads what, and why): `formats` (signatures,
sizes from headers), `vips` (libvips: JPEG, PNG, GIF, HEIF band by band), `tiff` (tifffile), `geo` (rasterio),
`slide` (OpenSlide), `remote` (fsspec) and `opencv` (WebP, BMP, PNM, HDR, Sun raster, JPEG 2000 and .npy, decoded
whole)."""
