"""The roster of tile processes (tasks/roster.py) with real worker nodes: a node that takes tiles announces its
pool size in the tile store, a node that only tiles and merges does not, and a stopped node withdraws."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import redis

from tasks import store
from tasks.local import RedisServer, Worker, _wait

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own


def test_nodes_that_take_tiles_announce_their_processes_until_they_stop():
    with RedisServer() as server:
        client = server.client()
        env = {"TILEREC_RESULT_BACKEND": server.url}
        with Worker(server.url, 3, queues=["tilerec.tiles"], env=env, name="tiles"):
            with Worker(server.url, 1, queues=["tilerec", "celery"], env=env, name="jobs"):
                _wait(lambda: store.tile_processes(client) == 3, 10, "the tiles node's announcement")
                members = client.zrange(store.ROSTER_KEY, 0, -1)
                assert [member.split(b"@")[0] for member in members] == [b"3"]  # the jobs node takes no tiles
            assert store.tile_processes(client) == 3
        assert store.tile_processes(client) == 0  # withdrawn as it stopped, not left to lapse


def test_a_lapsed_announcement_is_not_counted():
    with RedisServer() as server:
        client = server.client()
        gone = store.roster_member("gone@host", 5)
        store.announce_processes(client, gone, 60)
        store.announce_processes(client, store.roster_member("live@host", 2), 60)
        assert store.tile_processes(client) == 7
        client.zadd(store.ROSTER_KEY, {gone: time.time() - 1})  # its node stopped announcing a while ago
        assert store.tile_processes(client) == 2


def test_announcements_try_the_store_once_so_a_failover_never_holds_the_event_loop():
    """A node announces on its worker's event loop: a store that is down (failing over, restarting) costs an
    announcement one try, not the 30 s of retries the tasks' store calls ride through (the next one tries again)."""
    accepted = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def hang_up() -> None:
            with contextlib.suppress(OSError):  # closed: the test is over
                while True:
                    connection, _ = listener.accept()
                    accepted.append(connection.getpeername())
                    connection.close()

        threading.Thread(target=hang_up, daemon=True).start()
        client = store.connect(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", retries=0)
        with pytest.raises(redis.ConnectionError):
            store.announce_processes(client, store.roster_member("node@host", 2), 15)
    assert len(accepted) == 1
