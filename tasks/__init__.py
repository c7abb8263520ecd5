"""tilerec's Celery side: the app (tasks.celery), its tasks (tasks.jobs for images, tasks.video for clips), the tile
store, and the client.

`celery -A tasks worker` finds the app here.
"""

from pipeline.inference import TileFailure
from tasks.celery import app
from tasks.jobs import JobCancelled, finish, merge, recognize, recognize_crops, recognize_tiles
from tasks.video import merge_video, recognize_segment, recognize_video

__all__ = [
    "JobCancelled",
    "TileFailure",
    "app",
    "finish",
    "merge",
    "merge_video",
    "recognize",
    "recognize_crops",
    "recognize_segment",
    "recognize_tiles",
    "recognize_video",
]
