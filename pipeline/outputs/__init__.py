"""What is made of a recognition: `render` draws it on the image, `export` writes it as COCO, GeoJSON, hOCR, text
or MOT, `pyramid` cuts Deep Zoom tiles for the viewer, `datasets` reads and writes COCO datasets, and `evaluate`
scores results against a COCO ground truth."""
