"""Synthetic scenes with known content, for the demo and the tests: `codes` (QR codes, ArUco markers, EAN-13
barcodes, moving stickers; the `Scene` and `Truth` types and scoring), `photos` (pasted pictures) and `text`
(pages of text, with word recall and character error rate)."""
