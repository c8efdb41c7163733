"""How the engine orders its work on the device, without stalling the host: the one seam for
the CUDA-only calls (streams, events, pinned copies), so that everything else is plain torch.

On CUDA, pre-processing runs on a stream of its own per decode thread and marks its end with
an event; the forward pass's stream waits for that event (the GPU waits, not a host thread),
and only the model thread ever waits for the device, for its own stream. Results come back
through pinned buffers, copied asynchronously, with one wait for all of them. On a CPU every
call does nothing: work runs in order on the calling thread.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Protocol

import torch


class Timer(Protocol):
    def ms(self) -> float:
        """The stage's time on the device; on CUDA, valid once its stream has been waited for."""


class DeviceQueue(Protocol):
    def side(self) -> ContextManager[None]:
        """Run the enclosed work (pre-processing) on this thread's own stream."""

    def ready(self) -> Any:
        """A marker of the work issued so far on the current stream (None where there is no need)."""

    def wait(self, marker: Any, tensor: torch.Tensor) -> None:
        """Make the current stream wait for `marker` before using `tensor`, made on another stream."""

    def timer(self) -> ContextManager[Timer]:
        """Time the enclosed stage."""

    def finish(self) -> None:
        """Wait for the work issued on this thread's current stream (never the whole device)."""

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor`, possibly still in flight until `finish`."""

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (on the host) on the device: pinned and asynchronous on CUDA."""


class _WallTimer:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ended = self.started

    def ms(self) -> float:
        return (self.ended - self.started) * 1000


class CpuQueue:
    def side(self) -> ContextManager[None]:
        return nullcontext()

    def ready(self) -> None:
        return None

    def wait(self, marker: Any, tensor: torch.Tensor) -> None:
        pass

    @contextmanager
    def timer(self) -> Iterator[_WallTimer]:
        timer = _WallTimer()
        yield timer
        timer.ended = time.perf_counter()

    def finish(self) -> None:
        pass

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class _EventTimer:
    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def ms(self) -> float:
        return self.start.elapsed_time(self.end)


class CudaQueue:
    def __init__(self, device: torch.device):
        self.device = device
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream:
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(self.device)
        return self._local.stream

    def side(self) -> ContextManager[None]:
        return torch.cuda.stream(self._stream())

    def ready(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, marker: Any, tensor: torch.Tensor) -> None:
        current = torch.cuda.current_stream(self.device)
        if marker is not None:
            current.wait_event(marker)
        tensor.record_stream(current)  # the allocator must not reuse it while this stream may still read it

    @contextmanager
    def timer(self) -> Iterator[_EventTimer]:
        timer = _EventTimer()
        timer.start.record(torch.cuda.current_stream(self.device))
        yield timer
        timer.end.record(torch.cuda.current_stream(self.device))

    def finish(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory().to(self.device, non_blocking=True)


def for_device(device: torch.device) -> DeviceQueue:
    return CudaQueue(device) if device.type == "cuda" else CpuQueue()
