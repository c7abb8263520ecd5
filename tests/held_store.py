"""A relay in front of the tile store that holds a tiling process mid-decoding, at a known row.

The tiling node reaches the store through it (TILEREC_STORE_URL). A streamed PNG's tiling task sets the job's
`ready` count at the end of each row of tiles and waits for the answer (`store.put_tiles`): once the relay has
passed on a count at or past `hold_after(count)`, it passes nothing more from that connection, so the decoder waits
there until its process is killed (`drop`) or the test lets it go on (`release`). The kill tests land mid-decoding
by construction, on a machine of any speed, and a test sees tiles recognized while the rows below are not decoded.
"""

from __future__ import annotations

import socket
import threading
from typing import BinaryIO

from tasks.local import free_port

HOLD_LIMIT_S = 300.0  # a hold never dropped ends rather than keep a tiling process waiting for ever


def command(reader: BinaryIO) -> tuple[bytes, list[bytes]] | None:
    """The next command a Redis client sent (an array of bulk strings): its bytes as sent and its parts; None at
    the end of the stream."""
    header = reader.readline()
    if not header:
        return None
    raw, parts = [header], []
    for _ in range(int(header[1:])):
        length = reader.readline()
        data = reader.read(int(length[1:]) + 2)
        raw += [length, data]
        parts.append(data[:-2])
    return b"".join(raw), parts


class StoreGate:
    """A relay on a free local port to the Redis on `port`; `hold_after(count)` arms it for one hold."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.port = free_port()
        self.lock = threading.Lock()
        self.armed: int | None = None
        self.held: int | None = None  # the count at which a connection is held now
        self.holding = threading.Event()
        self.holds: list[threading.Event] = []  # one per held connection: set, it is closed or goes on
        self.going_on = False  # whether the held connections go on (`release`) rather than close (`drop`)
        self.listener = socket.create_server(("127.0.0.1", self.port))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_after(self, count: int) -> None:
        """Hold the next connection that sets a job's `ready` count to `count` or more, once it has."""
        with self.lock:
            self.armed, self.held = count, None
            self.holding.clear()

    def wait_held(self, timeout: float = 120) -> int:
        """The count at which a tiling process is held, once one is."""
        assert self.holding.wait(timeout), f"no tiling process set `ready` to {self.armed} or more"
        assert self.held is not None
        return self.held

    def drop(self) -> None:
        """Close the held connections (their processes killed): nothing they sent after the hold reaches the store."""
        self._end_holds(going_on=False)

    def release(self) -> None:
        """Let the held connections go on: what they sent meanwhile reaches the store, and the decoders go on."""
        self._end_holds(going_on=True)

    def disarm(self) -> None:
        """Hold nothing more, and let go on what is held (a test is over; the next one uses the same nodes)."""
        with self.lock:
            self.armed = None
        self.release()

    def _end_holds(self, going_on: bool) -> None:
        with self.lock:
            self.going_on = going_on
            for hold in self.holds:
                hold.set()
            self.holds.clear()

    def __enter__(self) -> StoreGate:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.drop()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()
            threading.Thread(target=self._commands, args=(client, server), daemon=True).start()

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(1 << 16):
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()

    def _commands(self, client: socket.socket, server: socket.socket) -> None:
        with client.makefile("rb") as reader:
            try:
                while sent := command(reader):
                    server.sendall(sent[0])
                    if (hold := self._hold(sent[1])) and not (hold.wait(HOLD_LIMIT_S) and self.going_on):
                        break
            except OSError:
                pass
            finally:
                server.close()
                client.close()

    def _hold(self, parts: list[bytes]) -> threading.Event | None:
        """The hold of this connection, if this command sets a `ready` count the gate is armed for (the connection
        waits from now on until it is set); else None."""
        if len(parts) < 3 or parts[0].upper() != b"SET" or not parts[1].endswith(b":ready"):
            return None
        with self.lock:
            if self.armed is None or int(parts[2]) < self.armed:
                return None
            self.armed, self.held = None, int(parts[2])
            hold = threading.Event()
            self.holds.append(hold)
        self.holding.set()
        return hold
