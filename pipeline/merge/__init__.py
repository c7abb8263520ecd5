"""Merging tile results into one: `detections` places each tile's detections in the image and merges the duplicates
across tile seams; `lines` joins text lines cut by seams and orders a page's lines for reading."""
