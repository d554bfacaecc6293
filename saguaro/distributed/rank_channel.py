"""`RankChannel`: a pipe to another rank over torch.distributed, for the Saguaro worker protocol."""

from __future__ import annotations

import contextlib
import datetime
import io
import pickle
import queue
import threading
import time

import torch
import torch.distributed as dist


class _HostPickler(pickle.Pickler):
    """Pickles tensors from host memory: a draft's distributions computed on the drafter's GPU
    arrive as CPU tensors, not as tensors on a device of another rank."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return obj.cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return NotImplemented


class RankChannel:
    """A pipe to another rank (send / recv / poll of picklable objects), over torch.distributed.

    It stands in for a multiprocessing Connection in the worker protocol. Each message is its size,
    then its pickled bytes, sent without waiting (two ranks sending at once never deadlock). gloo's
    point-to-point receives cannot be polled, so a daemon thread receives in turn and queues what
    arrives; a peer that is gone (or a failed transfer) reads as EOFError, as a closed pipe does.
    One channel per peer for the life of the process, ended by a "bye" from either side.
    """

    def __init__(self, peer: int, group):
        self.peer, self.group = peer, group
        self.failed = False
        self.last_seq = 0  # the highest request number sent: a new worker numbers after it
        self.owner = None  # weakref to the DraftWorker whose session the peer serves
        self._inbox: queue.Queue = queue.Queue()
        self._peeked = None  # a message poll took from the inbox, next in line for recv
        self._sends: list = []
        self._receiver = threading.Thread(target=self._receive_all, daemon=True, name="saguaro-rank-channel")
        self._receiver.start()

    def _receive_all(self) -> None:
        while True:
            try:
                size = torch.zeros(1, dtype=torch.long)
                dist.recv(size, self.peer, group=self.group)
                data = torch.empty(int(size[0]), dtype=torch.uint8)
                dist.recv(data, self.peer, group=self.group)
                message = pickle.loads(data.numpy().tobytes())
            except Exception as error:  # gloo: "Connection closed by peer", a failed transfer
                self._inbox.put(EOFError(f"rank {self.peer} is gone ({error})"))
                return
            self._inbox.put(message)
            if message == ("bye",):
                return

    def send(self, message) -> None:
        if isinstance(message[0], int):
            self.last_seq = max(self.last_seq, message[0])
        buffer = io.BytesIO()
        _HostPickler(buffer).dump(message)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.long)
        try:
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
            for tensor in (size, data):
                # The tensors must outlive the transfer: keep them with their pending work.
                self._sends.append((dist.isend(tensor, self.peer, group=self.group), tensor))
        except RuntimeError as error:
            self.failed = True
            raise BrokenPipeError(f"rank {self.peer} is gone ({error})") from error

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message is waiting; waits up to `timeout` seconds for one (None: for ever)."""
        if self._peeked is None:
            try:
                self._peeked = self._inbox.get(timeout=timeout)
            except queue.Empty:
                return False
        return True

    def recv(self):
        message, self._peeked = self._peeked if self._peeked is not None else self._inbox.get(), None
        if isinstance(message, EOFError):
            self.failed = True
            self._peeked = message  # every later read sees the end too
            raise message
        return message

    def say_goodbye(self, timeout: float = 10.0) -> None:
        """End the channel on both sides: the peer's receiver gets "bye", ours waits for its "bye"."""
        with contextlib.suppress(BrokenPipeError):
            self.send(("bye",))
        deadline = time.monotonic() + timeout
        for work, _ in self._sends:
            with contextlib.suppress(RuntimeError):
                work.wait(datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
        self._receiver.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Nothing to release: the channel lives as long as the process group (see `shutdown`)."""
