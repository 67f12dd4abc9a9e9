"""Where and how a stage runs, shared by every layer that runs a model: the
device, full-fp32 numerics, seeds (one per stage, derived from run.seed) and
peak-memory accounting. Imports nothing of the package."""
from __future__ import annotations

import hashlib
import json
import platform
import random
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def use_fp32_numerics() -> None:
    """Full fp32 for every matmul and convolution (PyTorch lets cuDNN convolutions use
    TF32 by default). Training and the benchmark run with the numerics of the bounds:
    whether TF32 or bf16 training leaves the accuracies unchanged is not measured yet."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), or platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record(device: torch.device) -> dict:
    """What decides the bits of a training run besides its code, params and seed: the same
    run on another processor (another vector instruction set) or torch gives other weights.
    The cpu campaign's vanilla guide, retrained on a later machine from the same code, data
    and seed, differed from the first epoch on (results/cpu/README.md)."""
    return {"device": device_name(device), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def stage_seed(seed: int, *tags: str) -> int:
    """A seed per stage (and method) derived from run.seed, so that models of
    different stages never start from the same random weights: a certified
    model initialised like the vanilla one would look trivially similar to it."""
    digest = hashlib.sha256(json.dumps([seed, *tags]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors since the last reset; 0 on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return 0.0
