"""torch.autocast for the fused ops: compute in the dtype eager convolutions would get."""
from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype eager convolutions run in under torch.autocast on this device type, None when it is off (or
    autocast has no such device type: "meta", which the argument checks meet before the path is chosen)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def cast_for_autocast(x: Tensor, *tensors: Optional[Tensor]):
    """Under autocast, the activations and weights in its dtype (as eager convolutions get them); BN
    statistics and scale/shift stay fp32. Gradients flow back to fp32 master weights through the cast."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return (x, *tensors)
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, *tensors))
