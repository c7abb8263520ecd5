"""tilerec's Celery side: the app (tasks.celery), its tasks (tasks.jobs), the tile store, and the client.

`celery -A tasks worker` finds the app here.
"""

from pipeline.inference import TileFailure
from tasks.celery import app
from tasks.jobs import JobCancelled, finish, merge, recognize, recognize_crops, recognize_tiles

__all__ = ["JobCancelled", "TileFailure", "app", "finish", "merge", "recognize", "recognize_crops", "recognize_tiles"]
