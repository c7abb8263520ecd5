"""tilerec's library: tiling, image loading, recognizers, merging and the result model. No Celery here."""

from pipeline.inference import recognize_image
from pipeline.model import Detections, Recognition
from pipeline.options import JobOptions, OptionsError, parse_options
from pipeline.readers.images import ImageError
from pipeline.recognizers import RecognizerError, available, get_recognizer
from pipeline.tiling import Window, grid
from pipeline.video.clips import recognize_video

__all__ = [
    "Detections",
    "ImageError",
    "JobOptions",
    "OptionsError",
    "Recognition",
    "RecognizerError",
    "Window",
    "available",
    "get_recognizer",
    "grid",
    "parse_options",
    "recognize_image",
    "recognize_video",
]
