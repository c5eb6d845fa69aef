"""What a CUDA graph step needs around the model: its capture, and the host buffers its inputs
and sampled tokens cross by (pinned, used in turn, so that the host fills the next step's while
the device still copies the last one's). Off CUDA the same classes run with plain memory and no
events (every copy there is synchronous)."""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

_CAPTURE = threading.Lock()  # one capture at a time in the process (captures share torch's capture stream)


def capture(eager, device: torch.device, pool):
    """`eager` (a step over static buffers, returning its output tensor) captured as a CUDA graph
    in `pool`: a function that replays it and returns the same output tensor; None when an op in
    it cannot be captured (logged; the current stream is put back)."""
    with _CAPTURE:
        current = torch.cuda.current_stream(device)
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):  # warm up (cuBLAS handles, autotuning) off the capture
                for _ in range(2):
                    eager()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the worker's other engines (and its embedding model) keep launching work
            # from their own threads while this one captures
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                output = eager()
        except Exception:  # in the warm-up or the capture: the decoder stops capturing either way
            torch.cuda.set_stream(current)  # a failed capture can leave its capture stream current
            log.exception("CUDA graph capture failed")
            torch.cuda.synchronize(device)  # the side stream's queued steps too, before any buffer is freed
            return None

    def replay():
        graph.replay()
        return output

    return replay


class Ring:
    """Two host buffers used in turn (`take`, then `used` once a copy from or to it is launched).
    On CUDA they are pinned, and each is handed out again only after the device has finished the
    copy that last used it (an event recorded after that copy)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self._cuda = device.type == "cuda"
        self._buffers = [torch.zeros(shape, dtype=torch.long, pin_memory=self._cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if self._cuda else [None, None]
        self._device = device
        self._turn = 1

    def take(self) -> torch.Tensor:
        self._turn ^= 1
        if self._cuda:  # an event never recorded counts as passed
            wait(self._events[self._turn])
        return self._buffers[self._turn]

    def used(self):
        """The copy just launched on the buffer last taken: its event (None off CUDA), recorded
        again each time its buffer is used (its last reader is done with it by then)."""
        if not self._cuda:
            return None
        event = self._events[self._turn]
        event.record(torch.cuda.current_stream(self._device))
        return event


class Tokens:
    """A step's sampled tokens on their way to the host (a Ring buffer and the copy's event)."""

    def __init__(self, buffer: torch.Tensor, rows: int, event):
        self._buffer, self._rows, self._event = buffer, rows, event

    def get(self) -> list[int]:
        if self._event is not None:
            wait(self._event)
        return self._buffer[: self._rows].tolist()


def wait(event) -> None:
    """Until the device has passed `event` (a query first: a finished one costs no blocking call)."""
    if not event.query():
        event.synchronize()


def to_device(device: torch.device, values, dtype=None) -> torch.Tensor:
    """`values` (a list, or a tensor on the host) on the device without waiting for the device's
    queue (a pinned copy on CUDA: a plain one would wait for the step running ahead, slot_batch.py)."""
    cuda = device.type == "cuda"
    if isinstance(values, torch.Tensor):
        host = values.pin_memory() if cuda else values
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=cuda)
    return host.to(device, non_blocking=cuda)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
