"""Rematerialisation of the model's blocks by policy name: what `jax.checkpoint` keeps for the backward pass.

`train.remat` names one of `REMAT_POLICIES`; every resnet and transformer block of the UNet carries that name
(`UNet2DConditionModel(remat=...)`, `set_remat(model, name)`) and `call_maybe_remat` wraps the block's call in
`jax.checkpoint(policy=...)`:

  none                              no checkpoint: every activation of the block is kept (fastest, most memory)
  full                              keep nothing (`nothing_saveable`): the block's forward runs again in backward
  dots_saveable                     keep every matmul / conv output, recompute the elementwise work between them
  dots_with_no_batch_dims_saveable  keep matmul outputs without batch dims (weight-side products); recompute
                                    the rest (docs/DESIGN.md section 9: one SD block 1359 MiB -> 80 MiB)

A bool is accepted for older callers: True = 'dots_with_no_batch_dims_saveable' (the one policy the blocks used
before names existed), False = 'none'.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Optional[Callable[..., Any]]] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DEFAULT_REMAT = "dots_with_no_batch_dims_saveable"  # what `remat=True` means
REMAT_POLICY = REMAT_POLICIES[DEFAULT_REMAT]  # kept for callers of the single-policy era

Remat = Union[bool, str]


def remat_name(remat: Remat) -> str:
    """A bool or policy name -> the policy name; ValueError naming the choices for anything else."""
    if remat is True:
        return DEFAULT_REMAT
    if remat is False or remat is None:
        return "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {list(REMAT_POLICIES)} (or a bool)")
    return remat


def call_maybe_remat(remat: Remat, fn, module: nnx.Module, *args):
    """`fn(module, *args)`, rematerialised in the backward pass with the policy `remat` names ('none': plain call).

    The module is split into (graphdef, state) and merged inside a pure function, so this also works when the
    module was created outside the current trace (e.g. called inside a lax loop body), where `nnx.remat` refuses
    to write the module back. Blocks do not mutate state in their forward pass, so nothing needs writing back.
    """
    name = remat_name(remat)
    if name == "none":
        return fn(module, *args)
    graphdef, state = nnx.split(module)

    def pure(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return jax.checkpoint(pure, policy=REMAT_POLICIES[name])(state, *args)


def set_remat(model: nnx.Module, remat: Remat) -> None:
    """Sets the remat policy of every block of `model` that has one (resnet / transformer blocks of the UNet)."""
    name = remat_name(remat)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "remat", None), (bool, str)):
            node.remat = name
