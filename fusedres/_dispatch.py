"""Where a call runs: our Triton kernels, or (announced) the PyTorch reference.

The fused path runs on CUDA tensors, and on CPU tensors when the kernels were built for the Triton
interpreter (TRITON_INTERPRET=1 set before ``import fusedres``). Anything else falls back to the
reference with a one-time warning naming the reason; FUSEDRES_STRICT=1 makes every fallback an error.
"""
import os
import sys
import warnings
from typing import Optional

import torch


class FusedResFallbackWarning(UserWarning):
    """A fused op or block ran the PyTorch reference instead of the Triton kernels."""


class FusedResFallbackError(RuntimeError):
    """Raised instead of a fallback when FUSEDRES_STRICT=1."""


try:
    from fusedres import kernels as _kernels
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # no triton on this platform
    _kernels = None
    _IMPORT_ERROR = f"triton could not be imported ({exc})"

_warned = set()
# Frames of these packages are skipped when a warning looks for the caller's line.
_LIBRARY_FRAMES = ("fusedres", "torch", "torchvision", "timm", "triton")


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel (from fallback) of the first frame outside fusedres, torch, timm, ...:
    the user's line, however deep the module call stack is."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and \
            str(frame.f_globals.get("__name__", "")).split(".")[0] in _LIBRARY_FRAMES:
        frame, level = frame.f_back, level + 1
    return level


def strict() -> bool:
    return os.environ.get("FUSEDRES_STRICT", "0") == "1"


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (decided when fusedres was imported)."""
    return _kernels is not None and _kernels.INTERPRETED


def unsupported_device_reason(device: torch.device) -> Optional[str]:
    """None when our kernels can run on tensors of ``device``, else why not."""
    if _kernels is None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreted():
            return None
        return ("CPU tensors run the Triton kernels only in the Triton interpreter; set TRITON_INTERPRET=1 "
                "before importing fusedres")
    return f"device type '{device.type}' is not supported by the Triton kernels"


def fallback(what: str, reason: str) -> None:
    """Announce (once per reason) that ``what`` runs the PyTorch reference; error under FUSEDRES_STRICT=1."""
    if strict():
        raise FusedResFallbackError(f"{what}: the fused Triton path cannot run this call ({reason}), and "
                                    f"FUSEDRES_STRICT=1 forbids falling back to the PyTorch reference")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fusedres: {what} runs the PyTorch reference instead of the fused Triton kernels: {reason}. "
                      f"(This warning is shown once per reason.)", FusedResFallbackWarning,
                      stacklevel=_user_stacklevel())
