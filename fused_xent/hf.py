"""Hugging Face ``transformers``: train a causal LM on fused_xent with one call.

```python
import fused_xent.hf

fused_xent.hf.patch(model)  # any decoder-only *ForCausalLM built the standard way
```

Importing this module does not import ``transformers``; :func:`patch` does.

What the two entry points do:

* :func:`ForCausalLMLoss` has the contract of transformers' own loss function of that name
  (``transformers/loss/loss_utils.py``) and can be installed as ``model.loss_function``: the labels
  shifted by one (or ``shift_labels`` given already shifted), ``ignore_index``, and with
  ``num_items_in_batch`` the summed loss divided by it. It reads bf16 / fp16 logits as they are
  (transformers makes a float32 copy first) and returns a float32 loss.
* :func:`patch` with ``linear=True`` (the default) makes a training call never hold the
  (B, T, V) logits: when the model is called with ``labels`` while gradients are enabled, the loss
  is :func:`fused_xent.linear_cross_entropy` of the hidden states entering the output embedding
  (``get_output_embeddings()``, the ``lm_head``) and that module's weight and bias, and the output's
  ``logits`` is ``None``. Every other call is the model's own forward.

Design: the model's own forward runs; only its head and its loss function are intercepted. Per
family patching (a forward rewritten for each architecture) would have to track every release of
every model; instead, a training call runs the model's unchanged ``forward`` with a request set on
the patch, and two things change for that call only:

1. The ``lm_head`` module's ``forward`` (replaced on the instance) receives the final hidden
   states, already sliced by ``logits_to_keep`` and already scaled by whatever the model does to
   them before the head, and computes the loss itself with ``linear_cross_entropy`` on its own
   ``weight`` and ``bias`` and the shifted labels (``ignore_index``, ``num_items_in_batch`` read
   from the call's keywords, as the model's loss function would get them). Running inside the
   head's ``forward`` is what makes FSDP2 work: ``fully_shard``'s pre-forward hook has gathered the
   weight, its post-forward hook registers the pre-backward hook on what the head returns, and the
   weight gradient lands on the gathered parameter, to be reduce-scattered as usual. A weight that
   is still a ``DTensor`` inside the forward (tensor parallelism, not FSDP) is refused, never read
   as a local shard.
2. Instead of logits the head returns a small *proxy* tensor: the loss followed by a few fixed
   probe values, with the hidden states' number of dimensions. The model then applies to it
   whatever it applies to logits (Gemma 2's softcap, Cohere's ``logit_scale``, Granite's
   ``logits_scaling``) and passes the result to ``self.loss_function``, which is the patch's: it
   takes the loss from the proxy (so the gradient flows through the head's output, as FSDP
   expects), and checks that the model transformed the probe values exactly as the softcap and
   scale read from the config predict. A model that transforms its logits some other way (an
   unknown multiplier, another order) gets a ``ValueError`` on its first training call, and on
   compiled calls a NaN loss; a wrong loss is never returned. The model adds a mixture-of-experts
   router loss to what its loss function returned, as it always does.

The softcap and scale come from the config (or its ``text_config``): ``final_logit_softcapping``
is our ``softcap``; the scale is read as TRL's fused head reads it (:meth:`_Patch.head_options`:
``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``), taken as
applied before the softcap (``softcap * tanh(scale * x / softcap)``), which the probe
confirms. The training call checks that the head was called once and the loss function once, with
the labels and loss keywords the model was given, and otherwise raises.

``patch`` replaces, on the instance only: ``model.forward`` (whose signature stays the original's,
so ``Trainer`` and ``generate`` see the same parameters), ``lm_head.forward`` and
``model.loss_function``; ``unpatch`` puts back what was there. ``linear=False`` only sets the loss
function. ``copy.deepcopy`` of a patched model gives a patched copy.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _trl
from .functional import cross_entropy, linear_cross_entropy

__all__ = ["ForCausalLMLoss", "generalized_jsd_loss", "patch", "unpatch"]

_ATTR = "_fused_xent_hf"  # the patch's state, on the model and on its head


class _Missing:
    """'No such attribute before the patch'; one instance, kept by copy and pickle."""

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
# The probe values the head returns after the loss: spread over the range where a softcap of
# 30 and a scale of 1/16 both change them by much more than the tolerance below.
_PROBE = (-37.5, -3.0, 0.5, 2.0, 11.0, 53.0)
_PROBE_RTOL = 1e-4  # float32 tanh / division rounding is ~1e-7


def _shifted(labels, ignore_index: int, shift_labels):
    """transformers' shift: position t predicts labels[t + 1]; the last position is ignored."""
    if shift_labels is None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"labels must be a tensor of class indices, got {type(labels).__name__} "
                "(or pass shift_labels)"
            )
        return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if not isinstance(shift_labels, torch.Tensor):
        raise TypeError(f"shift_labels must be a tensor, got {type(shift_labels).__name__}")
    return shift_labels


def _count_on(num_items_in_batch, device):
    """The count on ``device``: Trainer counts the items on the host or on another device; a
    copy to the loss's device is queued on the stream rather than waited for."""
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device, non_blocking=True)
    return num_items_in_batch


def _divide(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss
    return loss / _count_on(num_items_in_batch, loss.device)


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def ForCausalLMLoss(  # noqa: N802  (transformers' name)
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on fused_xent: a drop-in ``model.loss_function``.

    Args:
        logits: (..., T, V) float32 / float16 / bfloat16, read as they are (no float32 copy).
        labels: (..., T) class indices; position t's loss is against ``labels[..., t + 1]`` and the
            last position is ignored. Unused when ``shift_labels`` is given.
        vocab_size: V, which must be ``logits.shape[-1]``.
        num_items_in_batch: None for the mean over the non-ignored positions; otherwise the
            summed loss is divided by it (an int, or a tensor on any device: Trainer's count of
            the tokens in all the accumulated micro-batches, which makes gradient accumulation
            exact).
        ignore_index: label value whose positions give no loss.
        shift_labels: (..., T) labels already shifted (context / sequence parallelism passes
            them); then ``labels`` is not read.
        **kwargs: the model's other keywords, ignored (as transformers does).

    Returns:
        The 0-dim loss, float32 (float64 for float64 logits); NaN for "mean" over no items, as
        transformers.
    """
    del kwargs
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating tensor, got {getattr(logits, 'dtype', type(logits))}"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if logits.dim() == 0 or logits.shape[-1] != vocab_size:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not end in vocab_size={vocab_size}"
        )
    ignore_index = _check_ignore_index(ignore_index)
    target = _shifted(labels, ignore_index, shift_labels)
    rows = logits.reshape(-1, vocab_size)
    target = target.reshape(-1).to(rows.device, non_blocking=True)
    if num_items_in_batch is None:
        return cross_entropy(rows, target, ignore_index=ignore_index)
    weight = _per_item(num_items_in_batch, rows)
    if weight is None:
        loss = cross_entropy(rows, target, ignore_index=ignore_index, reduction="sum")
        return _divide(loss, num_items_in_batch)
    return cross_entropy(rows, target, ignore_index=ignore_index, reduction="sum",
                         token_weight=weight)  # fmt: skip


def _per_item(num_items_in_batch, rows: torch.Tensor) -> torch.Tensor | None:
    """``1 / num_items_in_batch`` as every position's ``token_weight`` (float32, one element
    expanded over the rows), so the sum the loss is divided by is weighted in the forward: the
    gradient the forward writes is then the whole step's, and an incoming gradient of 1 (Trainer's
    on one GPU) skips the backward's pass over the logits, which a division after the loss would
    cost. None (divide after) for a count of 0 given as a number, whose division is left to
    torch's rules, and for a count that is not 0-dim."""
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0:
            return None  # (divided after: the loss takes the count's shape, as transformers')
        count = _count_on(num_items_in_batch, rows.device)
        weight = torch.reciprocal(count.to(torch.float32))
    elif isinstance(num_items_in_batch, (int, float)) and num_items_in_batch:
        # (a fill on the device: a tensor made from the number would copy it, and wait)
        weight = torch.full((), 1.0 / num_items_in_batch, dtype=torch.float32, device=rows.device)
    else:
        return None
    return weight.expand(rows.shape[0])


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` on :func:`fused_xent.distillation_loss`: the same
    signature, divergence (``beta`` 0 the forward KL, 1 the reverse, between them the JSD with
    ``M = beta P_t + (1 - beta) P_s``, at ``temperature``, no T^2 factor) and reductions, so a GKD
    trainer takes it as it is (``trainer.generalized_jsd_loss = generalized_jsd_loss``).

    TRL's reductions are not fused_xent's: with ``num_items_in_batch`` the sum over the kept
    positions (labels not -100) divided by it; "batchmean" the sum over the kept positions
    divided by their number, or **without labels by the batch size** (the first dimension: per
    sequence, not per position); "sum" the sum; "mean" the mean over positions *and* classes
    (the sum divided by positions x V). ``distillation_loss(reduction="mean")`` is the mean over
    the kept positions. "none" (TRL: per position and class) is refused: use
    :func:`fused_xent.distillation_loss` with ``reduction="none"`` for per-position values.
    """
    from .distillation import distillation_loss

    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(
            f"reduction must be 'batchmean', 'sum' or 'mean' (TRL's), got {reduction!r}; for "
            "per-position values use fused_xent.distillation_loss(..., reduction='none')"
        )
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 1:
        raise TypeError("student_logits must be a tensor (..., V)")
    vocab = student_logits.shape[-1]
    target = None if labels is None else labels.reshape(-1)
    total = distillation_loss(
        student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), target,
        beta=beta, temperature=temperature, reduction="sum",
    )  # fmt: skip
    if num_items_in_batch is not None:
        return _divide(total, num_items_in_batch)
    if reduction == "sum":
        return total
    if labels is None:
        kept = student_logits.reshape(-1, vocab).shape[0]
    else:
        kept = (labels != -100).sum()
    if reduction == "mean":
        return total / (kept * vocab)
    denom = kept if labels is not None else student_logits.shape[0]
    return total / (denom.clamp_min(1) if isinstance(denom, torch.Tensor) else max(denom, 1))


class _Request:
    """What one training call of a patched model asks of its head and its loss function."""

    __slots__ = ("labels", "shift_labels", "num_items", "ignore_index", "head_out", "expected")

    def __init__(self, labels, shift_labels, num_items, ignore_index):
        self.labels = labels
        self.shift_labels = shift_labels
        self.num_items = num_items
        self.ignore_index = ignore_index
        self.head_out = None  # the proxy the head returned: (loss, *probe)
        self.expected = None  # the probe as the config's softcap and scale transform it


class _Patch:
    """A patched model's state: what was there before, and the training call in flight.

    Callable: it is the model's ``loss_function``.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None, linear: bool):
        self.linear = linear
        self.head = head
        self.forward_before = model.__dict__.get("forward", _MISSING)
        self.loss_before = model.__dict__.get("_loss_function", _MISSING)
        self.head_forward_before = (
            head.__dict__.get("forward", _MISSING) if head is not None else _MISSING
        )
        self.labels_position = None  # index of `labels` in the forward's positional parameters
        self.model = model  # (a cycle through the model's __dict__, as the head's)
        self.config = model.config
        self.request: _Request | None = None
        self.checked = False  # the probe has been checked on an eager call

    # -- options read from the config ------------------------------------------------------
    def _config_value(self, name: str):
        text = None
        get_text = getattr(self.config, "get_text_config", None)
        if callable(get_text):
            text = get_text()
        for config in (self.config, getattr(self.config, "text_config", None), text):
            value = getattr(config, name, None) if config is not None else None
            if value is not None:
                return value
        return None

    def head_options(self) -> tuple[float | None, float]:
        """(softcap, logit_scale) as fused_xent takes them: softcap * tanh(scale * x / softcap).

        The scale as TRL's fused head reads it, the first one present: ``logit_scale`` (Cohere;
        None reads as 1), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), then
        ``logits_scaling`` (Granite, MiniCPM3 divide by it; HyperCLOVA X multiplies)."""
        softcap = self._config_value("final_logit_softcapping")
        scale = self._config_value("logit_scale")
        for name in ("output_multiplier", "lm_head_multiplier"):
            if scale is None:
                scale = self._config_value(name)
        scaling = self._config_value("logits_scaling")
        if scale is None and scaling is not None:
            hyperclova = self._config_value("model_type") == "hyperclovax"
            scale = float(scaling) if hyperclova else 1.0 / float(scaling)
        return (float(softcap) if softcap else None), float(1.0 if scale is None else scale)

    # -- the loss function -----------------------------------------------------------------
    def __call__(
        self,
        logits,
        labels,
        vocab_size,
        num_items_in_batch=None,
        ignore_index=-100,
        shift_labels=None,
        **kwargs,
    ):
        request = self.request
        if request is None:
            return ForCausalLMLoss(
                logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
            )
        name = type(self.head).__name__
        if request.head_out is None:
            raise RuntimeError(
                "fused_xent.hf: the model computed its loss without calling its output "
                f"embedding ({name}, get_output_embeddings()) as a module; it cannot be patched "
                "with linear=True (use linear=False)"
            )
        if request.expected is None:
            raise RuntimeError("fused_xent.hf: the model called its loss function twice in a call")
        if not (_same(labels, request.labels) and _same(shift_labels, request.shift_labels)):
            raise RuntimeError(
                "fused_xent.hf: the model passed its loss function other labels than it was "
                "given; this model cannot be patched with linear=True (use linear=False)"
            )
        if num_items_in_batch is not request.num_items or ignore_index != request.ignore_index:
            raise RuntimeError(
                "fused_xent.hf: the model passed its loss function other num_items_in_batch / "
                "ignore_index than it was given; it cannot be patched with linear=True"
            )
        rows = self.head.weight.shape[0]
        if vocab_size != rows:
            raise ValueError(
                f"fused_xent.hf: vocab_size={vocab_size} but the output embedding has {rows} rows; "
                "the logits would have been reshaped, which linear=True cannot reproduce"
            )
        return self._loss_from_proxy(request, logits)

    def _loss_from_proxy(self, request: _Request, logits) -> torch.Tensor:
        expected, request.expected = request.expected, None
        proxy = request.head_out
        n_probe = len(_PROBE)
        if not isinstance(logits, torch.Tensor) or logits.numel() != n_probe + 1:
            raise ValueError(
                "fused_xent.hf: the model reshaped what its output embedding returned before the "
                "loss; cannot be patched with linear=True (use linear=False)"
            )
        seen = logits.detach().reshape(-1)[1:].to(expected.dtype)
        rtol = max(_PROBE_RTOL, 4 * torch.finfo(logits.dtype).eps)
        ok = torch.isclose(seen, expected, rtol=rtol, atol=rtol).all()
        if not self.checked and not torch.compiler.is_compiling():
            if not bool(ok):
                softcap, scale = self.head_options()
                raise ValueError(
                    "fused_xent.hf: the model transforms its logits in a way the config does not "
                    f"describe: the values {list(_PROBE)} became {seen.tolist()}, but softcap="
                    f"{softcap} and logit_scale={scale} (from final_logit_softcapping and the "
                    "first of logit_scale, output_multiplier, lm_head_multiplier, logits_scaling) "
                    f"give {expected.tolist()}. Use linear=False for this model"
                )
            self.checked = True
        # A fresh tensor: the model may add its router loss in place (`loss += ...`).
        loss = proxy.reshape(-1)[0]
        return loss + torch.where(ok, 0.0, math.nan).to(loss.dtype)


def _same(passed, given) -> bool:
    """The labels the model passed its loss are the ones it was called with (or a copy of them on
    another device, as a model split over devices makes)."""
    if passed is given:
        return True
    return (
        isinstance(passed, torch.Tensor)
        and isinstance(given, torch.Tensor)
        and passed.device != given.device
        and passed.shape == given.shape
        and passed.dtype == given.dtype
    )


def _head_forward(head: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """The patched output embedding: the original outside a training call; in one, the loss."""
    state: _Patch = head.__dict__[_ATTR]
    request = state.request
    if request is None:
        before = state.head_forward_before
        return before(input) if before is not _MISSING else type(head).forward(head, input)
    if request.head_out is not None:
        raise RuntimeError(
            "fused_xent.hf: the model called its output embedding twice in one call; it cannot "
            "be patched with linear=True (use linear=False)"
        )
    hidden, weight, bias = _head_operands(head, input.reshape(-1, input.shape[-1]))
    for name, tensor in (("weight", weight), ("bias", bias)):
        if _is_dtensor(tensor):
            raise TypeError(
                f"fused_xent.hf: the output embedding's {name} is a DTensor inside its forward "
                "(tensor parallelism?); only FSDP2's fully_shard, which gathers it before the "
                "forward, is supported"
            )
    softcap, scale = state.head_options()
    target = _shifted(request.labels, request.ignore_index, request.shift_labels)
    target = target.reshape(-1).to(hidden.device, non_blocking=True)
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"fused_xent.hf: {target.shape[0]} labels for {hidden.shape[0]} positions reaching "
            "the output embedding (logits_to_keep with labels?)"
        )
    reduction = "mean" if request.num_items is None else "sum"
    loss = linear_cross_entropy(
        hidden, weight, target, linear_bias=bias, reduction=reduction,
        ignore_index=request.ignore_index, softcap=softcap, logit_scale=scale,
    )  # fmt: skip
    loss = _divide(loss, request.num_items)
    probe = torch.tensor(_PROBE, dtype=loss.dtype, device=loss.device)
    expected = probe * scale
    if softcap is not None:
        expected = softcap * torch.tanh(expected / softcap)
    lead = (1,) * (input.dim() - 1)
    # One fresh tensor (not a view: FSDP2 warns about views), with the logits' number of dims.
    proxy = torch.cat([loss.reshape(*lead, 1), probe.reshape(*lead, -1)], dim=-1)
    request.head_out, request.expected = proxy, expected
    return proxy


def _plain_linear(module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _is_lora_linear(module) -> bool:
    """PEFT's LoRA ``Linear`` (its class is also called ``Linear``): a base layer and adapters."""
    return all(hasattr(module, a) for a in ("base_layer", "lora_A", "lora_B", "scaling"))


def _is_modules_to_save(module) -> bool:
    """PEFT's ``ModulesToSaveWrapper``: a trainable copy of the head per adapter."""
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _saved_module(wrapper):
    """The module a ``ModulesToSaveWrapper`` runs now (as its forward picks it)."""
    active = list(wrapper.active_adapters)
    adapters = getattr(wrapper, "_adapters", set(wrapper.modules_to_save.keys()))
    if wrapper.disable_adapters or not active or any(a not in adapters for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _head_problem(head, name: str) -> str | None:
    """Why ``head`` cannot be read as one linear map (weight, bias) of its input, or None."""
    if _plain_linear(head):
        return None
    if _is_modules_to_save(head):
        return _head_problem(_saved_module(head), name)
    if _is_lora_linear(head):
        if not _plain_linear(head.base_layer):
            return (
                f"{name}'s LoRA base layer is a {type(head.base_layer).__name__}, not an nn.Linear"
            )
        variants = [a for a in head.active_adapters if a in getattr(head, "lora_variant", {})]
        if variants:
            return (
                f"{name}'s LoRA adapter {variants[0]!r} is a variant (DoRA, ...): only plain LoRA "
                "heads are fused"
            )
        lora_b = head.lora_B
        with_bias = [a for a in head.active_adapters if a in lora_b and lora_b[a].bias is not None]
        if with_bias:
            return f"{name}'s LoRA adapter {with_bias[0]!r} has a bias (lora_bias): not fused"
        return None
    return (
        f"{name} is a {type(head).__name__}, not an nn.Linear (nor PEFT's LoRA Linear or "
        "modules_to_save wrapper of one): a wrapped or quantised head cannot be read as a weight "
        "and bias; use linear=False"
    )


def _head_operands(head, hidden, base=None):
    """(hidden', weight, bias) with ``hidden' @ weight.T + bias`` = ``head(hidden)``: an
    ``nn.Linear``'s own; a PEFT LoRA head's as one head over the concatenation ``[h, s A(drop(h))]``
    and ``[W, B]`` (exact: ``h W^T + s (A drop(h)) B^T``; the gradients reach A and B through
    the concatenation), a ``modules_to_save`` head's active copy. ``base`` (weight, bias) stands
    for the base layer's (TRL hands a gathered FSDP weight)."""
    if _is_modules_to_save(head):
        return _head_operands(_saved_module(head), hidden, base)
    if _is_lora_linear(head):
        hidden_b, weight, bias = _head_operands(head.base_layer, hidden, base)
        if head.disable_adapters or head.merged:
            return hidden_b, weight, bias
        parts_h, parts_w = [hidden_b], [weight]
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            lora_a = head.lora_A[name]
            x = head.lora_dropout[name](hidden.to(lora_a.weight.dtype))
            parts_h.append((lora_a(x) * head.scaling[name]).to(hidden_b.dtype))
            parts_w.append(head.lora_B[name].weight.to(weight.dtype))
        if len(parts_h) == 1:
            return hidden_b, weight, bias
        return torch.cat(parts_h, dim=-1), torch.cat(parts_w, dim=1), bias
    if base is not None:
        return hidden, base[0], base[1]
    return hidden, head.weight, head.bias


def _is_dtensor(tensor) -> bool:
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _patched_forward(model: nn.Module, args: tuple, kwargs: dict):
    state: _Patch | None = model.__dict__.get(_ATTR)
    if state is None:  # unpatched under a TRL head that still calls this forward
        return type(model).forward(model, *args, **kwargs)
    before = state.forward_before
    if before is _MISSING:
        original = functools.partial(type(model).forward, model)
    else:
        original = before
    if kwargs.get("fused_lm_head") and _trl.is_trl_forward(before):
        # Patched after TRL gave the model its fused head (patch(trainer.model)).
        return _trl_call(model, before, args, kwargs)
    position = state.labels_position
    if "labels" in kwargs:
        labels = kwargs["labels"]
    elif position is not None and len(args) > position:
        labels = args[position]
    else:
        labels = None
    if labels is None or not torch.is_grad_enabled():
        return original(*args, **kwargs)
    if state.request is not None:
        raise RuntimeError("fused_xent.hf: a patched model's forward was re-entered")
    _follow_head(model, state)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    request = _Request(
        labels,
        kwargs.get("shift_labels"),
        kwargs.get("num_items_in_batch"),
        _check_ignore_index(kwargs.get("ignore_index", -100)),
    )
    state.request = request
    try:
        out = original(*args, return_dict=True, **kwargs)
    finally:
        state.request = None
    if request.head_out is None:
        raise RuntimeError(
            f"fused_xent.hf: {type(model).__name__}.forward did not call its output embedding "
            f"({type(state.head).__name__}) as a module; it cannot be patched with linear=True"
        )
    if request.expected is not None:
        raise RuntimeError(
            f"fused_xent.hf: {type(model).__name__}.forward did not call self.loss_function with "
            "its labels; it cannot be patched with linear=True (use linear=False)"
        )
    # The proxy the model made of the logits is not logits: say None, as documented.
    out = type(out)(**{key: value for key, value in out.items() if key != "logits"})
    return out if return_dict else out.to_tuple()


def _follow_head(model: nn.Module, state: _Patch) -> None:
    """The patch moves to the model's output embedding of now, if another module took its place
    (PEFT wraps the head in a LoRA layer or a modules_to_save copy after the patch;
    resize_token_embeddings makes a new one); one that cannot be fused raises."""
    current = model.get_output_embeddings()
    if current is state.head:
        return
    problem = _head_problem(current, f"{type(model).__name__}.get_output_embeddings()")
    if problem is not None:
        raise ValueError(f"fused_xent.hf: the output embedding changed since the patch: {problem}")
    old = state.head
    if old is not None:
        _restore(old.__dict__, "forward", state.head_forward_before)
        old.__dict__.pop(_ATTR, None)
    state.head = current
    state.head_forward_before = current.__dict__.get("forward", _MISSING)
    current.__dict__[_ATTR] = state
    current.forward = types.MethodType(_head_forward, current)


class _TrlCall:
    """One fused call of TRL's head on a patched model (``fused_xent._trl.ACTIVE``)."""

    __slots__ = ("model", "served")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.served = False

    def serve(self, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
        head = self.model.get_output_embeddings()
        problem = _head_problem(head, f"{type(self.model).__name__}.get_output_embeddings()")
        if problem is not None:
            raise ValueError(f"fused_xent.hf (TRL's fused LM head): {problem}")
        hidden, weight, bias = _head_operands(head, hidden, base=(weight, bias))
        return _trl.per_token(hidden, weight, bias, targets, temperature, softcap, logit_scale,
                              outputs)  # fmt: skip


def _trl_call(model: nn.Module, trl_forward, args: tuple, kwargs: dict):
    """TRL's fused forward with fused_xent serving its head; raises if it did not."""
    _trl.require()
    call = _TrlCall(model)
    token = _trl.ACTIVE.set(call)
    try:
        out = trl_forward(*args, **kwargs)
    finally:
        _trl.ACTIVE.reset(token)
    if not call.served:
        raise RuntimeError(
            f"fused_xent.hf: TRL {_trl.trl_version()}'s fused LM head returned without the call "
            f"fused_xent serves ({_trl._FUNCTION}): this TRL computes it another way (fused_xent "
            f"is tested with TRL {_trl.TESTED_TRL}); pin that release or unpatch the model"
        )
    return out


def _make_trl_forward(trl_forward):
    """TRL's fused forward with its fused calls served by fused_xent; TRL's signature kept (as
    TRL keeps the model's: ``generate`` validates its keywords against it)."""

    def forward(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, **kwargs)
        return _trl_call(self, trl_forward, args, {**kwargs, "fused_lm_head": True})

    functools.update_wrapper(forward, getattr(trl_forward, "__func__", trl_forward))
    forward._fused_xent_trl = trl_forward
    return forward


def _on_trl_head(model) -> None:
    """TRL just gave ``model`` its fused head: if fused_xent patched the model (or the base
    model of this PEFT model), TRL's fused calls are served by fused_xent from now on."""
    if _base_of(model).__dict__.get(_ATTR) is None:
        return
    trl_forward = model.__dict__.get("forward")
    if trl_forward is not None and _trl.is_trl_forward(trl_forward):
        model.forward = types.MethodType(_make_trl_forward(trl_forward), model)


_trl.on_fused_head = _on_trl_head
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the patches in effect


def _base_linear(head):
    """The nn.Linear whose weight ``head.weight`` is (through PEFT's wrappers)."""
    if _is_modules_to_save(head):
        return _base_linear(_saved_module(head))
    if _is_lora_linear(head):
        return _base_linear(head.base_layer)
    return head


def _divergence_server(student_weight):
    """fused_xent's server for TRL's chunked divergence when ``student_weight`` is the head
    weight of a patched model, else None (TRL's own function runs)."""
    for state in list(_LIVE):
        head = state.model.get_output_embeddings()
        if head is not None and getattr(_base_linear(head), "weight", None) is student_weight:
            return functools.partial(_serve_divergence, state.model, head)
    return None


def _serve_divergence(model, head, h_s, w_s, b_s, h_t, w_t, b_t, beta, temperature=1.0,
                      s_scale=1.0, s_softcap=None, t_scale=1.0, t_softcap=None):  # fmt: skip
    """TRL's ChunkedDivergenceFunction (per-token divergence, the student's entropy) by
    :func:`fused_xent.linear_distillation_loss`: a scale multiplies the hidden states and the
    bias (exact for a power of two), a LoRA head is one head over the concatenation."""
    from .distillation import linear_distillation_loss

    name = type(model).__name__
    if s_softcap is not None or t_softcap is not None:
        raise ValueError(
            f"fused_xent.hf: TRL's distillation trainer with a softcapped model "
            f"(final_logit_softcapping; student {name}) is not served by fused_xent, whose "
            "distillation has no softcap: unpatch the student (fused_xent.hf.unpatch) to use "
            "TRL's own loss"
        )
    problem = _head_problem(head, f"{name}.get_output_embeddings()")
    if problem is not None:
        raise ValueError(f"fused_xent.hf (TRL's distillation trainer): {problem}")
    h_s, w_s, b_s = _head_operands(head, h_s, base=(w_s, b_s))
    heads = []
    for h, w, b, scale in ((h_s, w_s, b_s, s_scale), (h_t, w_t, b_t, t_scale)):
        if scale != 1.0:
            h, b = h * scale, None if b is None else b * scale
        if w.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            w, b = w.to(h.dtype), None if b is None else b.to(h.dtype)  # as TRL casts the head
        heads.append((h, w, b))
    (h_s, w_s, b_s), (h_t, w_t, b_t) = heads
    # The teacher gets no gradient (as TRL's): its tensors read as constants.
    h_t, w_t = h_t.detach(), w_t.detach()
    b_t = None if b_t is None else b_t.detach()
    return linear_distillation_loss(
        h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, beta=float(beta),
        temperature=float(temperature), reduction="none", return_entropy=True,
    )  # fmt: skip


_trl.divergence_server = _divergence_server


def _base_of(model):
    """The transformers model of a PEFT model (``get_base_model()``); any other model itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.split(".")[0] == "peft":
        return get_base()
    return model


def _make_forward(signature: inspect.Signature, doc: str | None):
    def forward(self, *args, **kwargs):
        return _patched_forward(self, args, kwargs)

    # Trainer (dataset columns, loss keywords) and generate() read the forward's signature.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = signature.replace(
        parameters=[self_param, *signature.parameters.values()]
    )
    forward.__doc__ = (doc or "") + (
        "\n\nPatched by fused_xent.hf (linear=True): called with `labels` while gradients are "
        "enabled, the loss comes from fused_xent.linear_cross_entropy on the final hidden states "
        "and the returned `logits` is None."
    )
    return forward


def _causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss as hf_loss

    return hf_loss


def _check_model(model, linear: bool) -> tuple[nn.Module | None, inspect.Signature]:
    """The standard layout, or an error naming what is missing. Returns (head, forward sig)."""
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - the module's tests skip without it
        raise ImportError(
            "fused_xent.hf.patch needs transformers: pip install 'fused_xent[hf]'"
        ) from exc
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; patch takes decoder-only causal LMs")
    loss = model.loss_function
    if loss is not _causal_lm_loss() and loss is not ForCausalLMLoss:
        raise ValueError(
            f"{name}.loss_function is {getattr(loss, '__qualname__', type(loss).__name__)}, not "
            "transformers' ForCausalLMLoss: not a causal LM (or its loss was replaced)"
        )
    original = model.__dict__.get("forward", model.forward)
    signature = inspect.signature(original)
    if "labels" not in signature.parameters:
        raise ValueError(f"{name}.forward takes no `labels`")
    if not linear:
        return None, signature
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, nn.Module):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError):  # older releases raise where none is
            decoder = None
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise ValueError(
            f"{name} has no decoder module (neither `model.model` nor `model.get_decoder()`)"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{name}.get_output_embeddings() returned None: no output embedding")
    problem = _head_problem(head, f"{name}.get_output_embeddings()")
    if problem is not None:
        raise ValueError(problem)
    return head, signature


def patch(model, *, linear: bool = True):
    """Make a transformers causal LM compute its training loss with fused_xent, in place.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` of a decoder-only causal LM built the
            standard way: a decoder (``model.model`` or ``get_decoder()``), an ``nn.Linear``
            output embedding (``get_output_embeddings()``) that its forward calls as a module, and
            transformers' ``ForCausalLMLoss`` as ``loss_function``. Anything else raises
            ``TypeError`` / ``ValueError`` naming what is missing, and nothing is changed.
        linear: True (the default): a call with ``labels`` while gradients are enabled computes
            the loss with :func:`fused_xent.linear_cross_entropy` on the final hidden states and
            the output embedding's weight and bias, so the (B, T, V) logits never exist; **the
            returned ``logits`` is then None**. Everything else is the model's own: the decoder's
            arguments (``logits_to_keep``, ``past_key_values``, hidden states and attentions when
            asked), ``return_dict``, a mixture-of-experts router loss added as the model adds it,
            tied embeddings, the config's softcap and logit scale. Without labels, or under
            ``torch.no_grad()`` (generation, evaluation), the model's forward runs as before, with
            :func:`ForCausalLMLoss` as its loss function. False: only the loss function becomes
            :func:`ForCausalLMLoss`; the logits are made and returned as before.

    Returns:
        ``model``, patched. Patching again with the same ``linear`` does nothing; with the other
        one re-patches. :func:`unpatch` restores the original.
    """
    if not isinstance(linear, bool):
        raise TypeError(f"linear must be a bool, got {type(linear).__name__}")
    given, model = model, _base_of(model)
    state = getattr(model, "__dict__", {}).get(_ATTR)
    if state is not None:
        if state.linear == linear:
            return given
        unpatch(model)
    head, signature = _check_model(model, linear)
    _trl.ensure_hooks()
    state = _Patch(model, head, linear)
    model.__dict__[_ATTR] = state
    _LIVE.add(state)
    if not linear:
        model.loss_function = ForCausalLMLoss
        _on_trl_head(model)  # a TRL head already there: its fused calls are fused_xent's
        return given
    model.loss_function = state
    params = [
        p
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    names = [p.name for p in params]
    state.labels_position = names.index("labels") if "labels" in names else None
    original = model.__dict__.get("forward", _MISSING)
    doc = type(model).forward.__doc__ if original is _MISSING else original.__doc__
    model.forward = types.MethodType(_make_forward(signature, doc), model)
    head.__dict__[_ATTR] = state
    head.forward = types.MethodType(_head_forward, head)
    return given


def unpatch(model):
    """Undo :func:`patch`: the model's forward, its head's forward and its loss function are what
    they were before (a fused head TRL added after the patch stays, TRL's own again). A model that
    is not patched is returned unchanged; a PEFT model's base model is unpatched."""
    given, model = model, _base_of(model)
    state = getattr(model, "__dict__", {}).get(_ATTR)
    if state is None:
        return given
    if state.request is not None:
        raise RuntimeError("fused_xent.hf.unpatch called during the patched model's forward")
    trl_forward = getattr(model.__dict__.get("forward"), "_fused_xent_trl", None)
    if trl_forward is not None:
        model.__dict__["forward"] = trl_forward
    elif state.linear:
        _restore(model.__dict__, "forward", state.forward_before)
    if state.linear:
        _restore(state.head.__dict__, "forward", state.head_forward_before)
        state.head.__dict__.pop(_ATTR, None)
    _restore(model.__dict__, "_loss_function", state.loss_before)
    del model.__dict__[_ATTR]
    _LIVE.discard(state)
    return given


def _restore(namespace: dict, key: str, before) -> None:
    if before is _MISSING:
        namespace.pop(key, None)
    else:
        namespace[key] = before
