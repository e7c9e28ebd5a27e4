"""The writer in a child process, so that compression and HDF5 writes overlap the teacher's play.

`BackgroundWriter` takes the calls of a `writer.DatasetWriter` (flush, stage, finalize) and has its
child carry them out in order; a flush is durable when the next flush (or finalize) returns, so a
crash loses no more than with the synchronous writer (see `writer` for the crash-safety protocol).
The parent packs each flush (`packing`) and sends it down a pipe with its arrays out of band and
its frames one message per episode (`_send_packed`), received by the child straight into one array.
"""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any, Sequence

import numpy as np

from multitask.data.packing import Packed, WriterCounts
from multitask.data.processes import background_supported, become_helper, fork_context, stop_process
from multitask.data.schema import Episode
from multitask.data.writer import DatasetWriter


class BackgroundWriter(WriterCounts):
    """A DatasetWriter in a child process: part files, masters and staging overlap the caller's work.

    Same calls as DatasetWriter. At most one flush is in flight: `flush` first waits until the
    previous one is durable (its error, e.g. NaN teacher outputs, is raised there), so a crash loses
    at most the episodes of the flush in progress, as with the synchronous writer. A flush's per-step
    and per-episode arrays are packed here and go down the pipe out of band (pickle protocol 5), its
    frames one message per episode, received by the child straight into one array; all from a
    thread: 64 MiB take ~0.5 s to pass (measured), which the caller's loop would otherwise spend
    blocked (the thread waits in the kernel, without the GIL). The child ignores
    Ctrl-C (the caller decides) and is killed with its parent (Linux PR_SET_PDEATHSIG), so a killed
    build never leaves a writer behind that could race a `--resume`. Linux only (fork start):
    elsewhere `start` returns the synchronous writer.
    """

    def __init__(self, writer: DatasetWriter):
        ctx = fork_context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_writer_process, args=(writer, child, os.getpid()), daemon=True,
                                 name=f"writer {writer.path.name}")
        self._proc.start()
        child.close()
        self.path, self.attrs = writer.path, dict(writer.attrs)
        self.durable_steps = writer.durable_steps
        self._in_flight = False
        self._sender: threading.Thread | None = None
        self._send_error: BaseException | None = None

    @classmethod
    def start(cls, writer: DatasetWriter) -> "BackgroundWriter | DatasetWriter":
        return cls(writer) if background_supported() else writer

    def flush(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        self._hand_over("flush", episodes, attrs_update)

    def stage(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        self._hand_over("stage", episodes, attrs_update)

    def finalize(self, attrs_update: dict[str, Any] | None = None, episodes: Sequence[Episode] = ()) -> None:
        self._hand_over("finalize", episodes, attrs_update)
        self._wait()
        self.close()

    def _hand_over(self, op: str, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None) -> None:
        """Once the previous operation is durable, pack here and send from a thread; count at once."""
        self._wait()
        packed = self.pack(episodes, join_frames=False)  # the child receives them into one array
        self._sender = threading.Thread(target=self._send, args=(op, packed, attrs_update),
                                        name="writer hand-off", daemon=True)
        self._sender.start()
        self._in_flight = True
        self.attrs.update(attrs_update or {})
        self._count(packed)

    def _send(self, op: str, packed: Packed, attrs_update: dict[str, Any] | None) -> None:
        try:
            _send_packed(self._conn, op, packed, attrs_update)
        except BaseException as e:  # noqa: BLE001 - raised by the caller's next _wait
            self._send_error = e

    def _wait(self) -> None:
        if not self._in_flight:
            return
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        try:
            if self._send_error is not None:
                raise EOFError
            status, payload = self._conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"the writer process of {self.path} died; resume the build with --resume") from None
        self._in_flight = False
        if status == "error":
            self.close()
            raise payload
        self.durable_steps = payload

    def close(self) -> None:
        """Stop the child after the operation in flight (durable or not: both leave a valid file)."""
        if self._sender is not None:  # its message must end before the next one starts
            self._sender.join()
            self._sender = None
        if self._proc.is_alive():
            try:
                _send_packed(self._conn, "stop", None, None)
            except (BrokenPipeError, OSError):
                pass
            stop_process(self._proc, timeout=60)
        self._conn.close()


def _send_out_of_band(conn, message: Any) -> None:
    """Send with arrays' bytes as separate messages: no pickled copy of them (pickle protocol 5)."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(len(buffers).to_bytes(8, "little") + head)
    for b in buffers:
        conn.send_bytes(b.raw())


def _recv_out_of_band(conn) -> Any:
    msg = conn.recv_bytes()
    count = int.from_bytes(msg[:8], "little")
    return pickle.loads(msg[8:], buffers=[conn.recv_bytes() for _ in range(count)])


def _send_packed(conn, op: str, packed: Packed | None, attrs_update: dict[str, Any] | None) -> None:
    """An operation for the writer's child: the arrays out of band, then the frames one message per
    piece, which `_recv_packed` receives straight into one array (no joined copy on either side)."""
    if packed is None:
        _send_out_of_band(conn, (op, None, attrs_update, [], None))
        return
    pieces = packed.frames  # the episodes' frame arrays (`pack(..., join_frames=False)`)
    row = pieces[0].shape[1:] if pieces else ()
    _send_out_of_band(conn, (op, packed._replace(frames=None), attrs_update, [len(p) for p in pieces], row))
    for p in pieces:
        conn.send_bytes(np.ascontiguousarray(p, dtype=np.uint8).reshape(-1))  # flat: send_bytes sends len(view) items


def _recv_packed(conn) -> tuple[str, Packed | None, dict[str, Any] | None]:
    op, packed, attrs_update, lengths, row = _recv_out_of_band(conn)
    if packed is None:
        return op, None, attrs_update
    frames = np.empty((sum(lengths), *row), dtype=np.uint8)
    flat, offset, row_bytes = memoryview(frames.reshape(-1)), 0, int(np.prod(row, dtype=np.int64))
    for n in lengths:
        got = conn.recv_bytes_into(flat, offset)
        if got != n * row_bytes:  # a message out of step would leave both sides waiting forever
            raise RuntimeError(f"writer hand-off out of step: a piece of {got} bytes, expected {n * row_bytes}")
        offset += got
    return op, packed._replace(frames=frames), attrs_update


def _writer_process(writer: DatasetWriter, conn, parent: int) -> None:
    """Child side of BackgroundWriter: run the parent's calls in order, answer each."""
    if not become_helper(parent):
        return
    while True:
        try:
            op, packed, attrs_update = _recv_packed(conn)
        except EOFError:
            op = "stop"
        if op == "stop":
            writer.close()
            return
        try:
            if op == "flush":
                writer.write(packed, attrs_update)
            elif op == "stage":
                writer.stage_packed(packed, attrs_update)
            else:
                writer.commit(packed, attrs_update)
            conn.send(("ok", writer.durable_steps))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            writer.close()
            try:
                conn.send(("error", e))
            except Exception:  # not picklable
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
            return
