"""Seconds since a step started, on the device that computes it: what the DDP and FSDP2 clocks both measure with.

    timer = DeviceTimer(device)
    timer.start()                 # at the start of the step, before forward
    timer.elapsed_s()             # later: seconds of work queued since then, finished

On CUDA the host clock would read when kernels were queued, not when they ran: the timer records events in the
stream (the current one at start(), or the one given) and waits for the second. Elsewhere it is the host clock.
"""
from __future__ import annotations

import time

import torch


class DeviceTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.started = 0.0                       # host clock at start()
        self.stream = None                       # CUDA: the stream the events are recorded in
        self._start_event = self._ready_event = None

    def start(self) -> None:
        if self.cuda:
            self.stream = torch.cuda.current_stream(self.device)
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._ready_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record(self.stream)
        self.started = time.perf_counter()

    def elapsed_s(self) -> float:
        if self.cuda:
            self._ready_event.record(self.stream)
            self._ready_event.synchronize()
            return self._start_event.elapsed_time(self._ready_event) / 1000
        return time.perf_counter() - self.started
