"""Per-example gradients of ``nn.Linear`` layers from forward and tensor hooks.

DP-SGD clips each example's gradient, so it needs one gradient per example, not their sum. For a
linear layer y = x Wᵀ + b with input x (n, ..., d_in) and output gradient g = ∂L/∂y
(n, ..., d_out), example i's gradients are ∂L_i/∂W = Σ_t g_it x_itᵀ (d_out, d_in) and
∂L_i/∂b = Σ_t g_it: one batched matmul over the example's positions t.

Opacus' ``GradSampleModule`` computes the same thing for any layer type through module *full
backward hooks*, which wrap every hooked module's inputs and outputs in extra autograd nodes
and run its bookkeeping (accumulation lists, forward counters) per module and batch. With LoRA
every trainable tensor sits in a small ``nn.Linear`` (A: d → r, B: r → d, the head), so that
fixed cost is a visible share of a round: ``bench/throughput.py`` measures both. This module
keeps the maths and drops the machinery: a forward hook saves the layer's input and registers a
hook on its output tensor, which receives g during the backward pass.

The per-example gradients land in ``p.grad_sample`` (n, *p.shape), the attribute Opacus'
``DPOptimizer`` clips, noises and accounts, so clipping, noise and accounting stay Opacus'.
Only layers whose trainable parameters are ``nn.Linear`` weights and biases are supported
(:func:`supports`); anything else keeps Opacus' hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _trainable_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)
            and any(p.requires_grad for p in m.parameters(recurse=False))]


def supports(model: nn.Module) -> bool:
    """True when every trainable parameter of ``model`` is the weight or bias of an
    ``nn.Linear`` (LoRA's A and B, a linear head), so :class:`LinearGradSampler` computes all
    of its per-example gradients."""
    return _covers(model, _trainable_linears(model))


def _covers(model: nn.Module, linears: list[nn.Linear]) -> bool:
    covered = {id(p) for m in linears for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(trainable) and all(id(p) in covered for p in trainable)


class LinearGradSampler:
    """Attach to ``model``: every backward pass then leaves each trainable linear parameter's
    per-example gradients in ``p.grad_sample`` (n, *p.shape), summed over the layer's calls in
    that pass (a layer used twice gets both contributions, as the true gradient does).

    ``loss_reduction`` says how the backpropagated loss was reduced over the n examples of the
    batch: ``"sum"`` (gradients are per-example as they come) or ``"mean"`` (they carry a
    factor 1/n, undone here), as Opacus' own argument of that name. Batch first: dimension 0 of
    every layer input is the example. ``p.grad_sample`` is left for the consumer (Opacus'
    ``DPOptimizer.zero_grad`` clears it); a second backward pass before that adds to it.

    Use as a context manager or call :meth:`close`: it removes the hooks and the attribute.
    """

    def __init__(self, model: nn.Module, *,
                 loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        linears = _trainable_linears(model)
        if not _covers(model, linears):
            bad = sorted({type(m).__name__ for m in model.modules()
                          if not isinstance(m, nn.Linear)
                          and any(p.requires_grad for p in m.parameters(recurse=False))})
            raise ValueError("LinearGradSampler computes per-example gradients of nn.Linear "
                             "layers only; " + (f"trainable parameters also sit in {bad}" if bad
                                                else "the model has no trainable parameter"))
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        self._mean = loss_reduction == "mean"
        self._params = [p for m in linears for p in m.parameters(recurse=False)
                        if p.requires_grad]
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._capture) for m in linears]

    def _capture(self, module: nn.Linear, inputs: tuple[Any, ...], output: Any) -> None:
        # Evaluation, no_grad, or a layer whose output needs no gradient: nothing to do.
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad):
            return
        x = inputs[0].detach()  # (n, ..., d_in); detached: the hook must not extend the graph
        output.register_hook(self._per_example(module, x))

    def _per_example(self, module: nn.Linear,
                     x: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:  # g: ∂L/∂output, (n, ..., d_out)
            # In the parameter's dtype (fp32 under bf16 autocast, where x and g arrive in
            # bf16): DP-SGD's clip norms are computed from these and must not be rounded, so
            # autocast is off here too (a backward pass run inside autocast would otherwise
            # turn this bmm back into bf16).
            with torch.autocast(device_type=g.device.type, enabled=False):
                self._add(module, x, g)
        return hook

    def _add(self, module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> None:
        weight, bias = module.weight, module.bias
        n = g.shape[0]
        g, xw = _as(g, weight.dtype), _as(x, weight.dtype)
        if g.dim() == 2:  # (n, d_out) x (n, d_in): one position per example
            gw = g.unsqueeze(2) * xw.unsqueeze(1)  # (n, d_out, d_in)
            gb = g * n if self._mean else g.clone()  # never keep autograd's own tensor
        else:  # positions t flattened: (n, d_out, T) @ (n, T, d_in)
            g3 = g.reshape(n, -1, g.shape[-1])
            gw = torch.bmm(g3.transpose(1, 2), xw.reshape(n, -1, xw.shape[-1]))
            gb = g3.sum(dim=1)  # (n, d_out)
            if self._mean:
                gb.mul_(n)
        if self._mean:
            gw.mul_(n)
        _accumulate(weight, gw)
        if isinstance(bias, torch.Tensor):
            _accumulate(bias, gb)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample

    def __enter__(self) -> LinearGradSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _accumulate(p: torch.Tensor, grad_sample: torch.Tensor) -> None:
    if not p.requires_grad:
        return
    previous = getattr(p, "grad_sample", None)
    p.grad_sample = grad_sample if previous is None else previous + grad_sample  # type: ignore[attr-defined]
