"""Helpers shared by the PyTorch parity tests: the error measure and NHWC <-> NCHW conversion."""

import numpy as np
import torch


def rel_l2(ours, ref) -> float:
    """Relative L2 error of `ours` against the reference, computed in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nchw(x) -> torch.Tensor:
    """Our NHWC array as a PyTorch NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A PyTorch NCHW tensor as an NHWC NumPy array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)
