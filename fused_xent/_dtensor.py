"""DTensor inputs (torch's tensor parallelism and FSDP2) on the ``process_group=`` path.

The losses take DTensors where torch's own parallelism makes them, and run the vocabulary-parallel
path on the local shards with the process group of the mesh dimension that shards the vocabulary:

* logits (or probability targets) ``Shard(class_dim)`` on one mesh dimension and replicated on the
  others: each rank's local shard is its slice of the classes, the slices in mesh order with
  DTensor's own sizes (``torch.chunk``'s: ``ceil(V / n)`` each, the last ones shorter). The
  outputs are replicated DTensors; the logits' gradient is a DTensor with the logits' placements
  (``to_local``'s backward).
* a linear head's weight (and bias) ``Shard(0)`` with replicated (DTensor) hidden states: the
  same, vocabulary-parallel without gathering the weight; the hidden states' gradient is summed
  over the ranks (replicated), the weight's stays local.
* a head's weight that is a sharded DTensor with plain (not DTensor) hidden states, as FSDP2's
  ``fully_shard`` leaves a parameter outside its module's forward: the weight is gathered
  (``full_tensor``) and its gradient reduce-scattered as an average over the mesh, FSDP2's own
  default (``Partial("avg")``); the outputs are plain tensors, each rank's own.
* replicated DTensors run as plain tensors (outputs replicated DTensors).

Anything else (partial placements, logits sharded on another dimension, two mesh dimensions
sharding the vocabulary) raises a ``ValueError`` naming the argument and its placements.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# DTensor's class, looked up on the first loss call (every call asks; importing it costs about a
# second, so not at import time). A module global rather than a cached function, which
# torch.compile warns about on every trace. False: not looked up yet; None: no DTensor here.
_DTENSOR = False


def _dtensor_type():
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch without distributed
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


def any_dtensor(*values) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(v, dtensor) for v in values)


def is_dtensor(value) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


class Layout(NamedTuple):
    """Where the vocabulary lives: the mesh, the mesh dimension that shards it (None: nowhere),
    that dimension's process group, and this rank's first class."""

    mesh: object
    mesh_dim: int | None
    group: object
    offset: int


def _placements(x) -> str:
    return "(" + ", ".join(str(p) for p in x.placements) + ")"


def vocab_layout(name: str, x, class_dim: int) -> Layout:
    """The layout of a DTensor whose dimension ``class_dim`` holds the classes."""
    dim = class_dim % x.ndim
    mesh_dim = None
    for i, p in enumerate(x.placements):
        if p.is_replicate():
            continue
        if p.is_shard(dim) and mesh_dim is None:
            mesh_dim = i
            continue
        what = "partial" if p.is_partial() else f"sharded on dimension {p.dim}"
        raise ValueError(
            f"{name} is a DTensor with placements {_placements(x)}: mesh dimension {i} is {what} "
            f"({p}); fused_xent takes the classes (dimension {dim}) sharded on one mesh "
            "dimension (Shard) and every other mesh dimension replicated; redistribute first "
            "(for logits sharded on the batch: .redistribute(placements=[Replicate()]) or "
            "call the loss on .to_local() per shard)"
        )
    if mesh_dim is None:
        return Layout(x.device_mesh, None, None, 0)
    n_classes = x.shape[dim]
    world = x.device_mesh.size(mesh_dim)
    coord = x.device_mesh.get_local_rank(mesh_dim)
    chunk = -(-n_classes // world)
    offset = min(coord * chunk, n_classes)
    local = x.to_local().shape[dim]
    if local != max(min(chunk, n_classes - offset), 0):
        raise ValueError(
            f"{name}: this rank's shard holds {local} classes where DTensor's Shard({dim}) of "
            f"{n_classes} over {world} ranks gives {max(min(chunk, n_classes - offset), 0)}"
        )
    return Layout(x.device_mesh, mesh_dim, x.device_mesh.get_group(mesh_dim), offset)


def local(name: str, x, layout: Layout, shard_dim: int | None = None):
    """``x`` as this rank needs it: a plain tensor as is; a DTensor on ``layout``'s mesh either
    replicated (its local copy) or, with ``shard_dim``, sharded like the vocabulary (its shard)."""
    if not is_dtensor(x):
        return x
    if x.device_mesh != layout.mesh:
        raise ValueError(f"{name} is a DTensor on another device mesh than the logits'")
    want = None if shard_dim is None else shard_dim % x.ndim
    for i, p in enumerate(x.placements):
        ok = p.is_replicate() if (i != layout.mesh_dim or want is None) else p.is_shard(want)
        if not ok:
            expected = "Replicate" if (i != layout.mesh_dim or want is None) else f"Shard({want})"
            raise ValueError(
                f"{name} is a DTensor with placements {_placements(x)}; expected {expected} on "
                f"mesh dimension {i}"
            )
    return x.to_local()


def class_slice(name: str, w, layout: Layout, n_local: int):
    """Per-class values (class weights) given whole, as a plain tensor or a replicated DTensor,
    or sharded like the vocabulary: this rank's slice."""
    if w is None:
        return None
    if is_dtensor(w) and layout.mesh_dim is not None and w.placements[layout.mesh_dim].is_shard():
        return local(name, w, layout, shard_dim=0)
    w = local(name, w, layout)
    if layout.mesh_dim is None:
        return w
    return w[layout.offset : layout.offset + n_local]


def replicate(out, layout: Layout):
    """Outputs (a tensor, a tuple, TokenStats) as DTensors replicated over the mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(out, torch.Tensor):
        placements = [Replicate()] * layout.mesh.ndim
        return DTensor.from_local(out, layout.mesh, placements, run_check=False)
    if isinstance(out, tuple):
        items = [replicate(o, layout) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
    return out


def gathered_weight(name: str, w):
    """A head's sharded DTensor weight with plain hidden states (FSDP2 outside its module's
    forward): the whole weight, whose gradient is averaged over the mesh and reduce-scattered
    back to the weight's placements, as FSDP2 reduces gradients by default."""
    from torch.distributed.tensor import Partial

    if any(p.is_partial() for p in w.placements):
        raise ValueError(f"{name} is a DTensor with partial placements {_placements(w)}")
    if all(p.is_replicate() for p in w.placements):
        return w.to_local()
    return w.full_tensor(grad_placements=[Partial("avg")] * w.device_mesh.ndim)
