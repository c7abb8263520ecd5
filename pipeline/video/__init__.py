"""Recognizing video: `frames` probes and decodes clips, `clips` plans segments and recognizes their frames with the
image pipeline, and `tracking` follows objects through the whole clip with one tracker over their detections."""
