"""Energy per inference, measured by the hardware's own energy counters, never estimated.

Two meters, one interface (:class:`EnergyMeter`: cumulative joules per counter, and where a counter
wraps):

- NVIDIA GPUs: NVML's total-energy counter, ``nvmlDeviceGetTotalEnergyConsumption`` ("total energy
  consumption for this GPU in millijoules (mJ) since the driver was last reloaded; for Volta or newer
  fully supported devices", NVML API reference), through ``nvidia-ml-py`` (``pip install
  hpcprune[gpu]``; imported only here, only when a GPU is measured). The whole board is counted.
- CPUs: Linux powercap's RAPL zones, ``/sys/class/powercap/intel-rapl:<n>/energy_uj`` (µJ, one
  counter per package; AMD Zen packages appear under the same name), wrapping at
  ``max_energy_range_uj`` (Linux ``Documentation/power/powercap/powercap.rst``). The package zones
  are summed: cores, caches and uncore, not DRAM. Since Linux 5.10 ``energy_uj`` is readable by root
  only (CVE-2020-8694); then the meter is unavailable and says so.

Anything else is **unavailable**, with the exact reason (no NVML, no NVIDIA GPU, no
``/sys/class/powercap``, permission denied): :class:`EnergyUnavailable`, recorded as
``energy_source = "unavailable: <reason>"`` and ``energy_j_per_sample = NaN``.

What is measured (:func:`measure`): the forward pass at the latency batch, repeated in a timed loop
of at least :data:`MIN_SECONDS` and :data:`MIN_ITERATIONS` (whichever takes longer), after
:data:`WARMUP` untimed passes. The energy is the counters' total increase over the loop, **not
idle-subtracted**: it includes what the device (board or package) draws at rest and whatever else
runs on it meanwhile. Joules per sample = energy / (iterations × batch). Why at least 2 s: NVML's
counter is updated every 20-100 ms on recent GPUs (PETSc's ``PetscLogGpuEnergyMeter`` notes), so a
read may lag the loop's start and its end by up to 100 ms each: over 2 s that is at most ±10 %, and
far less in practice (RAPL counters update about every millisecond). The counters are read every
:data:`SAMPLE_S` seconds during the loop, so a counter that wraps (RAPL) is followed through any
number of wraps.
"""
from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import HpcpruneError

RAPL_ROOT = "/sys/class/powercap"
MIN_SECONDS = 2.0  # the timed loop runs at least this long (the NVML counter's update period, above)
MIN_ITERATIONS = 10  # ... and at least this many forward passes
WARMUP = 3  # untimed passes first (as baseline.latency_*: allocations, kernel selection)
SAMPLE_S = 0.05  # the counters are read at least this often during the loop (wrap-around)


class EnergyUnavailable(HpcpruneError, RuntimeError):
    """No energy counter can be read for the device; the message is the reason, in one line."""


@dataclass
class EnergyResult:
    """One measurement: ``j_per_sample`` (J; NaN when unavailable), ``source`` (``nvml:<gpu name>``,
    ``rapl:<zones>`` or ``unavailable: <reason>``), the loop's joules, seconds, passes and batch."""

    j_per_sample: float
    source: str
    joules: float = math.nan
    seconds: float = 0.0
    iterations: int = 0
    batch: int = 0

    @property
    def measured(self) -> bool:
        return math.isfinite(self.j_per_sample)

    @classmethod
    def unavailable(cls, reason: str) -> "EnergyResult":
        return cls(math.nan, f"unavailable: {reason}")


class EnergyMeter:
    """Cumulative energy counters of one device: :meth:`read` gives joules per counter, ``ranges``
    the value (J) at which each wraps back to 0 (None: it does not)."""

    source = ""
    ranges: Sequence[float | None] = ()

    def read(self) -> list[float]:
        raise NotImplementedError


class RaplMeter(EnergyMeter):
    """The RAPL package zones under ``root`` (``intel-rapl:<n>``, not their subzones), summed.

    Raises EnergyUnavailable when ``root`` is missing, has no package zone, or a counter cannot be
    read (permission denied: root only since Linux 5.10)."""

    def __init__(self, root: str = RAPL_ROOT) -> None:
        if not os.path.isdir(root):
            raise EnergyUnavailable(f"RAPL: {root} missing")
        zones = sorted(z for z in glob.glob(os.path.join(root, "intel-rapl:*")) if os.path.basename(z).count(":") == 1)
        if not zones:
            raise EnergyUnavailable(f"RAPL: no package zone (intel-rapl:<n>) in {root}")
        self.files = [os.path.join(z, "energy_uj") for z in zones]
        names, ranges = [], []
        for z, path in zip(zones, self.files):
            try:
                with open(path) as fh:
                    int(fh.read())
            except PermissionError:
                raise EnergyUnavailable(f"RAPL: {path}: permission denied (root only since Linux 5.10)") from None
            except (OSError, ValueError) as e:
                raise EnergyUnavailable(f"RAPL: {path} unreadable ({e})") from None
            names.append(_read_text(os.path.join(z, "name")) or os.path.basename(z))
            top = _read_text(os.path.join(z, "max_energy_range_uj"))
            ranges.append(int(top) / 1e6 if top and top.isdigit() and int(top) > 0 else None)
        self.ranges = ranges
        self.source = "rapl:" + ",".join(names)

    def read(self) -> list[float]:
        out = []
        for path in self.files:
            with open(path) as fh:
                out.append(int(fh.read()) / 1e6)
        return out


class NvmlMeter(EnergyMeter):
    """NVML's total-energy counter (mJ) of the GPU that torch calls ``cuda:<index>`` (matched by
    UUID, so that ``CUDA_VISIBLE_DEVICES`` is honoured). Raises EnergyUnavailable without
    ``nvidia-ml-py``, without an NVIDIA GPU, or on a GPU without the counter (before Volta)."""

    def __init__(self, index: int = 0, uuid: str | None = None) -> None:
        try:
            import pynvml
        except ImportError:
            raise EnergyUnavailable("NVML: nvidia-ml-py not installed (pip install hpcprune[gpu])") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() == 0:
                raise EnergyUnavailable("NVML: no NVIDIA GPU")
            handle = None
            if uuid:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                except pynvml.NVMLError:
                    handle = None
            self.handle = handle if handle is not None else pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except EnergyUnavailable:
            raise
        except pynvml.NVMLError as e:
            what = "no total-energy counter on this GPU (Volta or newer)" if isinstance(e, pynvml.NVMLError_NotSupported) \
                else f"no NVIDIA GPU ({e})"
            raise EnergyUnavailable(f"NVML: {what}") from None
        self.ranges = [None]
        self.source = f"nvml:{self.name}"

    def read(self) -> list[float]:
        return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3]


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def meter_for(device: str, rapl_root: str | None = None) -> EnergyMeter:
    """The meter of ``device`` (``cpu``: RAPL under ``rapl_root``, default :data:`RAPL_ROOT`; ``cuda[:N]``: NVML).

    Raises EnergyUnavailable with the reason; on the CPU it also says why no GPU counter was used
    (``RAPL: /sys/class/powercap missing; NVML: no NVIDIA GPU``)."""
    if str(device).startswith("cuda"):
        import torch

        index = int(str(device).partition(":")[2] or 0)
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "") or None
        return NvmlMeter(index, uuid)
    try:
        return RaplMeter(rapl_root or RAPL_ROOT)
    except EnergyUnavailable as e:
        raise EnergyUnavailable(f"{e}; {_gpu_reason()}") from None


def _gpu_reason() -> str:
    """Why a CPU run has no GPU counter: NVML missing or no GPU, else that the run is on the CPU."""
    try:
        NvmlMeter(0)
    except EnergyUnavailable as e:
        return str(e)
    return "NVML: the run is on the CPU (device=cpu)"


def unavailable_reason(device: str, rapl_root: str | None = None) -> str | None:
    """None when ``device``'s energy can be measured here, else the reason (one line)."""
    try:
        meter_for(device, rapl_root)
    except EnergyUnavailable as e:
        return str(e)
    return None


def measure(step: Callable[[], None], meter: EnergyMeter, batch: int, min_seconds: float = MIN_SECONDS,
            min_iterations: int = MIN_ITERATIONS, warmup: int = WARMUP, sync: Callable[[], None] | None = None) -> EnergyResult:
    """Joules per sample of ``step`` (one forward pass of ``batch`` samples), run in a loop of at
    least ``min_seconds`` and ``min_iterations`` after ``warmup`` untimed passes; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before each counter read so that queued GPU work is
    counted. Not idle-subtracted (module docstring). The counters are read every
    :data:`SAMPLE_S` s: each one's increase is summed with its wrap-arounds (``meter.ranges``)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    prev = meter.read()
    joules, iterations = 0.0, 0
    t0 = last = time.perf_counter()
    while True:
        step()
        iterations += 1
        now = time.perf_counter()
        done = now - t0 >= min_seconds and iterations >= min_iterations
        if done or now - last >= SAMPLE_S:
            sync()
            cur = meter.read()
            joules += sum(_increase(a, b, r) for a, b, r in zip(prev, cur, meter.ranges))
            prev, last = cur, now
        if done:
            break
    seconds = time.perf_counter() - t0
    return EnergyResult(joules / (iterations * batch), meter.source, joules, seconds, iterations, batch)


def _increase(before: float, after: float, wrap: float | None) -> float:
    """A counter's increase between two reads; a counter that went down wrapped once (RAPL at
    ``max_energy_range_uj``) when its range is known."""
    if after >= before or wrap is None:
        return max(0.0, after - before)
    return after + wrap - before


def measure_model(model: object, example: object, batch: int, device: str, threads: int = 1,
                  rapl_root: str | None = None, min_seconds: float = MIN_SECONDS) -> EnergyResult:
    """Joules per sample of ``model``'s forward at ``batch`` (the example's rows repeated, as
    :func:`hpcprune.metrics.latency_ms`) on ``device``, in inference mode, on the CPU at ``threads``
    torch threads (0: as set). The model is left on ``device``. An unavailable meter gives
    ``EnergyResult.unavailable(reason)``, not an error."""
    import torch

    try:
        meter = meter_for(device, rapl_root)
    except EnergyUnavailable as e:
        return EnergyResult.unavailable(str(e))
    from .metrics import steady_allocator

    steady_allocator()  # as the latencies: no page faults of a cold allocator in the joules
    model = model.to(device).eval()  # type: ignore[attr-defined]
    x = example.to(device)  # type: ignore[attr-defined]
    x = x.repeat(math.ceil(batch / x.shape[0]), *([1] * (x.dim() - 1)))[:batch]
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else None
    saved = torch.get_num_threads()
    if threads > 0 and not x.is_cuda:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return measure(lambda: model(x), meter, batch, min_seconds=min_seconds, sync=sync)  # type: ignore[operator]
    finally:
        torch.set_num_threads(saved)
