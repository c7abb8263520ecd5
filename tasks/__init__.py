"""tilerec's Celery side: the app (tasks.celery), its tasks (tasks.jobs for images, tasks.video for clips), the
galleries of people and their tasks (tasks.gallery), the tile store, and the client.

`celery -A tasks worker` finds the app here.
"""

from pipeline.inference import TileFailure
from tasks.celery import app
from tasks.gallery import gallery_add, gallery_list, gallery_remove, gallery_rename
from tasks.job_record import JobCancelled
from tasks.jobs import finish, merge, recognize, recognize_crops, recognize_tiles
from tasks.video import merge_video, recognize_segment, recognize_video

__all__ = [
    "JobCancelled",
    "TileFailure",
    "app",
    "finish",
    "gallery_add",
    "gallery_list",
    "gallery_remove",
    "gallery_rename",
    "merge",
    "merge_video",
    "recognize",
    "recognize_crops",
    "recognize_segment",
    "recognize_tiles",
    "recognize_video",
]
