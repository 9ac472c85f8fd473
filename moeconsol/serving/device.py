"""Where and in what precision the runtime serves: `--device` and `--dtype` values checked
against this machine and turned into torch's objects."""

from __future__ import annotations

import torch

from ..errors import SettingsError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype` value -> torch dtype (None stays None: use the checkpoints' own dtype)."""
    if name is None:
        return None
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise SettingsError(f"unknown `dtype` {name!r}: use float32, bfloat16 or float16") from None


def parse_device(name: str) -> torch.device:
    """`--device` value -> torch device, checking that it exists on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SettingsError(f"unknown `device` {name!r}: use cpu or cuda (cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise SettingsError(f"unsupported `device` {name!r}: use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"`device` {name}: no CUDA device is available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingsError(f"`device` {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
