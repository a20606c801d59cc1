"""GPU energy from NVML's cumulative counter (millijoules since driver load), via ctypes.

No Python NVML binding is needed: the driver ships libnvidia-ml. Where there is no
CUDA device, no library, or the GPU does not support the counter (pre-Volta), the
meter reads None and reports say "n/a" instead of a made-up number.
"""

from __future__ import annotations

import ctypes
import os


class EnergyMeter:
    """`read()` -> joules consumed so far by the GPU behind a torch device, or None."""

    def __init__(self, device):
        self._lib = self._handle = None
        if getattr(device, "type", str(device)) != "cuda":
            return
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            index = self._nvml_index(device.index or 0)
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                return
            self._lib, self._handle = lib, handle
            if self.read() is None:
                self._lib = None
        except OSError:
            return

    @staticmethod
    def _nvml_index(torch_index: int) -> int:
        """NVML counts all GPUs; CUDA_VISIBLE_DEVICES may renumber them for torch."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if visible[0].strip().isdigit() and torch_index < len(visible):
            return int(visible[torch_index])
        return torch_index

    def read(self) -> float | None:
        if self._lib is None:
            return None
        mj = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj)) != 0:
            return None
        return mj.value / 1000.0
