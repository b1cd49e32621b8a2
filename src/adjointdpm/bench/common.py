"""Shared pieces of the benchmarks: model presets, seeded inputs, gradient metrics, memory and machine.

Memory is measured as the peak resident set size (RSS) of a fresh process: just before the measured call
the worker collects garbage, returns freed heap to the kernel (``malloc_trim``), reads its RSS and resets
the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``); after the call it reads the high-water
mark again (``VmHWM``). The difference is every page the call made resident — torch tensors, the
autograd graph, allocator slack, Python objects — at its worst moment. (tracemalloc does not see torch's
allocations and torch's profiler only sees tensors; RSS sees everything.) Where clear_refs is not
writable or the kernel accepts the write without resetting the mark (probed once per process by unmapping
32 MiB and checking that VmHWM follows), a thread samples RSS every millisecond instead (the JSON says which
method was used).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# -- machine and versions -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine_info() -> dict:
    import diffusers
    import numpy
    import transformers

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "loadavg_at_start": loadavg(),
    }
    for name in ("torchdiffeq", "peft", "matplotlib"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # optional
            info[name] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _mem_total_gib() -> float | None:
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return round(kib / 2**20, 1)
    except (OSError, AttributeError):
        return None


# -- memory -----------------------------------------------------------------------------------------


def _status_kibs(*keys: str) -> tuple[int, ...]:
    """The given /proc/self/status fields in KiB, from one read of the file."""
    text = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in keys)


def _status_kib(key: str) -> int:
    return _status_kibs(key)[0]


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_clear_refs() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_CLEAR_REFS_WORKS: bool | None = None


def clear_refs_resets_high_water_mark() -> bool:
    """Whether this kernel really resets VmHWM on ``clear_refs`` (probed once per process).

    A kernel (or sandbox) may accept the write and do nothing; then VmHWM keeps the process's old peak and a
    peak read from it is wrong whenever the process once held more than it holds now. The probe makes that
    case visible: it maps and touches 32 MiB, unmaps them (VmHWM now exceeds VmRSS by about 32 MiB), writes
    ``clear_refs`` and checks that VmHWM came down to VmRSS.
    """
    global _CLEAR_REFS_WORKS
    if _CLEAR_REFS_WORKS is None:
        import mmap

        size = 32 << 20
        try:
            block = mmap.mmap(-1, size)
            block.write(b"\1" * size)
            block.close()
        except (OSError, ValueError):
            _CLEAR_REFS_WORKS = False
            return False
        hwm, rss = _status_kibs("VmHWM", "VmRSS")
        if hwm < rss + (size >> 10) // 2 or not _write_clear_refs():
            _CLEAR_REFS_WORKS = False
        else:
            hwm, rss = _status_kibs("VmHWM", "VmRSS")
            _CLEAR_REFS_WORKS = hwm <= rss + (size >> 10) // 4
    return _CLEAR_REFS_WORKS


class PeakRSS:
    """Context manager: ``.peak_mib`` = peak RSS during the block minus RSS just before it."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        use_hwm = clear_refs_resets_high_water_mark() and _write_clear_refs()
        self.method = "VmHWM after clear_refs" if use_hwm else "RSS sampled every 1 ms"
        self.baseline_mib = rss_mib()
        if self.method.startswith("RSS"):
            self._max = self.baseline_mib
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_mib())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.method.startswith("RSS"):
            self._stop.set()
            self._thread.join()
            peak = max(self._max, rss_mib())
        else:
            peak = _status_kib("VmHWM") / 1024
        self.peak_mib = peak - self.baseline_mib


# -- gradient metrics --------------------------------------------------------------------------------


def compare(got: torch.Tensor | None, ref: torch.Tensor | None) -> dict | None:
    """Relative error ‖g − r‖/‖r‖ and cosine of a gradient against a reference (computed in float64)."""
    if got is None or ref is None:
        return None
    g, r = got.detach().double().flatten(), ref.detach().double().flatten()
    ref_norm = r.norm().item()
    return {
        "rel": (g - r).norm().item() / ref_norm if ref_norm > 0 else float("nan"),
        "cos": torch.nn.functional.cosine_similarity(g, r, dim=0).item(),
    }


# -- models ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A randomly initialised diffusers UNet2DConditionModel (``kind="unet"``) or the embedded digits
    model (``kind="embedded"``), with the shapes of the benchmark's inputs."""

    name: str
    kind: str = "unet"
    unet: dict = field(default_factory=dict)
    batch: int = 1
    text_len: int = 8
    guidance_scale: float = 7.5
    seed: int = 0
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        return cls(**data)


def _unet_config(channels, attention_levels, size, cross_dim, heads_dim, layers=1, groups=8, in_ch=4):
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    return dict(
        sample_size=size, in_channels=in_ch, out_channels=in_ch, layers_per_block=layers,
        block_out_channels=tuple(channels), down_block_types=tuple(down), up_block_types=tuple(up),
        cross_attention_dim=cross_dim, attention_head_dim=heads_dim, norm_num_groups=groups,
    )


PRESETS: dict[str, ModelSpec] = {
    # the gradient sweep's default: 64×64 latents, cheap convolutions at full resolution, attention only at 16²:
    # per step the activations (~60 MB with CFG) dwarf the weights (4.4 MB), as in Stable Diffusion
    "unet64": ModelSpec(
        "unet64", unet=_unet_config((32, 32, 64), (False, False, True), 64, 32, 2, groups=8),
        note="UNet2DConditionModel 64×64×4, channels (32, 32, 64), cross-attention at 16² only, random weights",
    ),
    # a larger UNet for the CPU suite (3.9 M parameters, wider at every level)
    "unet64-large": ModelSpec(
        "unet64-large", unet=_unet_config((32, 64, 128), (False, False, True), 64, 64, 4, groups=8),
        note="UNet2DConditionModel 64×64×4, channels (32, 64, 128), cross-attention at 16² only, random weights",
    ),
    # the smoke test's model (seconds)
    "tiny": ModelSpec(
        "tiny", unet=_unet_config((8, 16), (True, False), 8, 8, 4, groups=4, in_ch=2), text_len=3,
        guidance_scale=3.0, note="UNet2DConditionModel 8×8×2, channels (8, 16) (the test suite's model)",
    ),
    "embedded": ModelSpec("embedded", kind="embedded", note="the embedded digits model (adjointdpm.components)"),
}


@dataclass
class Setup:
    model: torch.nn.Module
    schedule: object
    prediction_type: str
    x_T: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    target: torch.Tensor
    guidance_scale: float


def embedded_available() -> tuple[bool, str]:
    """Whether ``adjointdpm.components.load_components()`` exists and loads the embedded model."""
    try:
        from adjointdpm.components import load_components
    except Exception as exc:  # not built yet
        return False, f"adjointdpm.components.load_components is not available ({type(exc).__name__}: {exc})"
    try:
        load_components()
    except Exception as exc:
        return False, f"load_components() failed ({type(exc).__name__}: {exc})"
    return True, ""


def build_setup(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> Setup:
    """The model (eval mode, no parameter requires grad) and seeded inputs, identical for every dtype."""
    import adjointdpm as adpm

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if spec.kind == "embedded":
        from adjointdpm.components import load_components

        comps = load_components(dtype=torch.float32)
        model = comps.unet
        schedule = adpm.VPSchedule.from_alphas_cumprod(comps.alphas_cumprod)
        prediction_type = comps.prediction_type
        with torch.no_grad():
            cond = comps.encode_prompt(["a handwritten digit seven"])
            uncond = comps.encode_prompt([""])
        shape = comps.latent_shape
        guidance = float(comps.settings.get("default_guidance_scale", spec.guidance_scale))
    else:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(spec.seed)
        model = UNet2DConditionModel(**spec.unet)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
        schedule = adpm.VPSchedule.from_betas(betas)
        prediction_type = "epsilon"
        cfg = spec.unet
        shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        g = torch.Generator().manual_seed(spec.seed + 1)
        cond = torch.randn(1, spec.text_len, cfg["cross_attention_dim"], generator=g)
        uncond = torch.randn(1, spec.text_len, cfg["cross_attention_dim"], generator=g)
        guidance = spec.guidance_scale
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(spec.seed + 2)
    x_T = torch.randn(spec.batch, *shape, generator=g, dtype=torch.float64)
    target = torch.randn(spec.batch, *shape, generator=g, dtype=torch.float64)
    return Setup(
        model, schedule, prediction_type, x_T.to(dtype), cond.to(dtype),
        None if guidance == 1.0 else uncond.to(dtype), target.to(dtype), guidance,
    )


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")


def write_report(path: str | os.PathLike, result: dict, *tables: str, minutes: bool = False) -> None:
    """A suite's end: its JSON written, its tables printed, and where it went with the suite's wall time."""
    write_json(path, result)
    for table in tables:
        print()
        print(table)
    took = f"{result['wall_s'] / 60:.1f} min" if minutes else f"{result['wall_s']:.0f} s"
    print(f"\nwrote {path} ({took})")


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
