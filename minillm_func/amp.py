"""Mixed precision: a pure loss-scaler state and a precision policy.

The scaler follows ``torch.amp.GradScaler``'s rules exactly, but as a value:
``ScalerState`` holds the scale, the growth tracker and the hyper-parameters as
0-d tensors, and every function returns a new state. GradScaler itself drives
optimizer objects and ``.grad`` fields, so it cannot serve functional updates.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, NamedTuple

import torch

from . import tree as T

__all__ = ["ScalerState", "scaler_init", "unscale", "scaler_update", "Policy"]


class ScalerState(NamedTuple):
    """Loss-scaler state; every field is a 0-d tensor.

    ``scale`` (float32) multiplies the loss; ``growth_tracker`` (int32) counts
    consecutive finite steps since the last change; the rest are the rules'
    hyper-parameters, held here so that ``scaler_update(state, found_inf)`` needs
    nothing else (the factors in float64: GradScaler multiplies the float32
    scale by a double and rounds back to float32, and so do we).
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    growth_factor: torch.Tensor
    backoff_factor: torch.Tensor
    growth_interval: torch.Tensor
    min_scale: torch.Tensor


def scaler_init(init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                growth_interval: int = 2000, min_scale: float = 0.0) -> ScalerState:
    """A fresh scaler with GradScaler's defaults; ``min_scale`` is a floor GradScaler lacks (0: none)."""
    if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1
            and 0 <= min_scale <= init_scale):
        raise ValueError(
            "scaler_init: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, "
            f"growth_interval >= 1 and 0 <= min_scale <= init_scale; got init_scale={init_scale}, "
            f"growth_factor={growth_factor}, backoff_factor={backoff_factor}, "
            f"growth_interval={growth_interval}, min_scale={min_scale}.")
    f32 = lambda x: torch.tensor(float(x), dtype=torch.float32)  # noqa: E731
    f64 = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    return ScalerState(
        scale=f32(init_scale), growth_tracker=torch.zeros((), dtype=torch.int32),
        growth_factor=f64(growth_factor), backoff_factor=f64(backoff_factor),
        growth_interval=torch.tensor(int(growth_interval), dtype=torch.int32), min_scale=f32(min_scale))


def unscale(state: ScalerState, grads: Any) -> tuple[Any, torch.Tensor]:
    """``(grads / scale, found_inf)``: found_inf is a 0-d bool, true when any gradient is inf or NaN.

    Like GradScaler, multiplies by the float32 reciprocal of the scale computed in
    double precision. The input grads are not modified.
    """
    inv = state.scale.double().reciprocal().float()
    grads = T.scale(grads, inv)
    return grads, ~T.all_finite(grads)


def scaler_update(state: ScalerState, found_inf: torch.Tensor) -> ScalerState:
    r"""The next scaler state, by GradScaler's rules (``torch._amp_update_scale_``).

    - non-finite step: ``scale <- max(scale * backoff_factor, min_scale)``, tracker <- 0;
    - finite step: tracker <- tracker + 1; when it reaches ``growth_interval``,
      ``scale <- scale * growth_factor`` (only if that is finite) and tracker <- 0.

    Branch-free (``torch.where``), so it compiles and vmaps.
    """
    found = torch.as_tensor(found_inf).to(state.scale.device) != 0
    tracker = state.growth_tracker + 1
    grow = tracker >= state.growth_interval
    grown = (state.scale.double() * state.growth_factor).float()
    grown = torch.where(torch.isfinite(grown), grown, state.scale)
    backed = torch.maximum((state.scale.double() * state.backoff_factor).float(), state.min_scale)
    scale = torch.where(found, backed, torch.where(grow, grown, state.scale))
    tracker = torch.where(found | grow, torch.zeros_like(tracker), tracker)
    return state._replace(scale=scale, growth_tracker=tracker)


class Policy(NamedTuple):
    """A precision policy: params stored in ``param_dtype``, ``apply`` run under autocast to ``compute_dtype``.

    ``Policy()`` is full precision (no autocast). ``Policy(compute_dtype=torch.bfloat16)``
    is the usual mixed precision: bf16 on CPU, fp16 or bf16 on CUDA (fp16 needs a loss scaler).
    Losses reduce half-precision logits in float32.
    """

    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != self.param_dtype

    def autocast(self, device_type: str):
        """The autocast context for ``device_type`` ('cpu', 'cuda', 'mps'), or a no-op at full precision."""
        if not self.mixed:
            return nullcontext()
        if device_type == "cpu" and self.compute_dtype != torch.bfloat16:
            raise ValueError(
                f"Policy: autocast on CPU supports bfloat16 only, got {self.compute_dtype}; "
                "use Policy(compute_dtype=torch.bfloat16).")
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    def wrap(self, apply: Callable) -> Callable:
        """``apply`` run under this policy's autocast (device taken from the input ids)."""

        def wrapped(params, input_ids, *args, **kwargs):
            with self.autocast(input_ids.device.type):
                return apply(params, input_ids, *args, **kwargs)

        return wrapped
