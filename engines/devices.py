"""Where models run: one rule for training, inference and the app.

``resolve_device(spec, local_rank)`` turns what a user asks for (``"auto"``, ``"cpu"``,
``"cuda"``, ``"cuda:N"``) into a ``torch.device``, or raises ``ValueError`` with a message
meant for the user before any work starts. ``"auto"`` takes this process's GPU when torch
sees one (``cuda:<LOCAL_RANK>``, so each torchrun process gets its own), else the CPU.

``dist_backend(device)`` is the process-group backend for a device: NCCL for the CUDA
tensors DDP all-reduces, with gloo beside it for the CPU tensors the trainer reduces itself
(the cancel flag) and for ``all_gather_object``; plain gloo on the CPU.

Torch is imported on first use, so the command line can check a ``--device`` spelling
without loading it.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::([0-9]+))?$")


def local_rank() -> int:
    """This process's rank on its node (torchrun sets LOCAL_RANK; 0 otherwise)."""
    try:
        return max(0, int(os.environ.get("LOCAL_RANK", "0") or 0))
    except ValueError:
        return 0


def check_device_spec(spec: str) -> str:
    """``spec`` normalised (lower case, no blanks) if it is one of auto, cpu, cuda, cuda:N;
    ``ValueError`` otherwise. Says nothing about whether the device exists."""
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N (N a GPU index)")
    return text


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The device ``spec`` names on this machine.

    * ``"auto"`` (or None): ``cuda:<local_rank>`` when ``torch.cuda.is_available()``, else cpu;
    * ``"cpu"``: the CPU;
    * ``"cuda"``: ``cuda:<local_rank>`` (each process of a torchrun job its own GPU);
    * ``"cuda:N"``: GPU N.

    Raises ``ValueError`` for anything else, when CUDA is asked for and torch sees no GPU, and
    when the index is not one of the GPUs torch sees."""
    import torch

    if isinstance(spec, torch.device):
        kind, index = spec.type, spec.index
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {str(spec)!r}: use auto, cpu, cuda or cuda:N")
        text = str(spec)
    else:
        text = check_device_spec("auto" if spec is None else spec)
        m = _SPEC.match(text)
        kind, index = m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
    if kind == "cpu":
        return torch.device("cpu")
    rank = max(0, int(local_rank))
    available = torch.cuda.is_available()
    if kind == "auto":
        if not available:
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if rank >= count:
            raise ValueError(
                f"device auto: this is local rank {rank}, but torch sees only {count} GPU(s); "
                f"start at most {count} process(es) per node, or choose the device cpu")
        return torch.device("cuda", rank)
    if not available:
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(
            f"device {text}: CUDA was asked for but torch sees no GPU (torch {torch.__version__}, "
            f"{build}); choose the device cpu or auto")
    count = torch.cuda.device_count()
    n = rank if index is None else index
    if n >= count:
        which = "local rank" if index is None else "index"
        raise ValueError(
            f"device {text}: GPU {which} {n} is out of range: torch sees {count} GPU(s) "
            f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", n)


def dist_backend(device: torch.device | str) -> str:
    """The ``init_process_group`` backend for a process whose model lives on ``device``:
    ``"cpu:gloo,cuda:nccl"`` for a CUDA device when torch sees a GPU and has NCCL (not on
    Windows builds, for one), else ``"gloo"``."""
    import torch
    import torch.distributed as dist

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def cuda_device_choices() -> list[tuple[str, str]]:
    """(label, spec) for each GPU torch sees, e.g. ("GPU 0 (cuda:0)", "cuda:0"). Uses only
    ``device_count`` (no CUDA context is made), so a GUI thread may call it."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(f"GPU {i} (cuda:{i})", f"cuda:{i}") for i in range(torch.cuda.device_count())]
