"""Mixed precision, one setting for every trainer: `precision` = "auto", "fp32", "bf16" or "fp16".

"auto" is what a GPU site wants without thinking: bf16 autocast on a CUDA device with native
bf16, fp16 autocast with a gradient scaler on an older one, and fp32 on a CPU, except for the
trainers that were measured to lose nothing in bf16 (ModalityBank's generator and
discriminators: 1.6x faster at equal SSIM on a CPU with AMX), which take bf16 on CPUs with
native bf16. Every trainer steps through `MixedPrecision`, so the scaler's skip-on-overflow
and unscaling live here once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, where: str = "precision") -> None:
    """Refuse an unknown precision, naming the setting."""
    if precision not in PRECISIONS:
        raise ValueError(f"{where} must be one of {PRECISIONS}, got {precision!r}")


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this CUDA device (Ampere and later); torch's default check also counts
    emulation, which is slow, so older cards must not count."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str, bf16_on_cpu: bool = False) -> str:
    """The precision `precision` means on `device`: "auto" becomes fp32, bf16 or fp16.

    `bf16_on_cpu`: the caller lets "auto" take bf16 on a CPU with native bf16."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            return "bf16" if bf16_on_cpu and cpu_has_bf16() else "fp32"
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise ValueError(
            f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'fp16' or 'auto'"
        )
    if precision == "fp16" and device.type == "cpu":
        logger.warning("precision 'fp16' on a CPU is much slower than fp32; it is meant for CUDA devices")
    return precision


class MixedPrecision:
    """Autocast and, for fp16, a gradient scaler, for one optimiser's steps on one device.

    Args:
        precision: one of `PRECISIONS`.
        device: where the model runs.
        bf16_on_cpu: "auto" takes bf16 on a CPU with native bf16 (for trainers measured not to lose by it).
    """

    def __init__(self, precision: str, device: torch.device | str, bf16_on_cpu: bool = False):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device, bf16_on_cpu)
        self.dtype = DTYPES.get(self.precision)
        # fp16's narrow range underflows small gradients; bf16 has fp32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        # The scale of input gradients (`grad`): its own, since they are not the weights' gradients.
        self.input_scale = 2.0**16

    def autocast(self):
        """The context a forward pass runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backpropagate `loss` and step `optimizer` (an fp16 step with inf/nan gradients is skipped)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def step_from(
        self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Backpropagate given d(loss)/d(output) gradients (ModalityBank's sites send them) and step."""
        if self.scaler is None:
            torch.autograd.backward(list(outputs), list(grads))
            optimizer.step()
            return
        # Scaling the outputs scales every parameter gradient by the same factor as scaling the loss.
        torch.autograd.backward([self.scaler.scale(o) for o in outputs], list(grads))
        self.scaler.step(optimizer)
        self.scaler.update()

    def grad(self, loss: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(inputs) as fp32. Under fp16 the loss is scaled so small values survive, and
        a scale that overflows is halved and the gradient taken again (never an inf that leaves)."""
        if self.scaler is None:
            (g,) = torch.autograd.grad(loss, inputs)
            return g.float()
        while True:
            (g,) = torch.autograd.grad(loss * self.input_scale, inputs, retain_graph=True)
            g = g.float() / self.input_scale
            if bool(torch.isfinite(g).all()) or self.input_scale <= 1.0:
                break
            self.input_scale /= 2.0
        if not bool(torch.isfinite(g).all()):
            # No scale helps: the gradient itself is not finite (a diverged discriminator).
            raise FloatingPointError("the input gradient is not finite even unscaled under fp16; use bf16 or fp32")
        return g

    def describe(self) -> str:
        return f"{self.precision} on {self.device}" + (" with a gradient scaler" if self.scaler is not None else "")
