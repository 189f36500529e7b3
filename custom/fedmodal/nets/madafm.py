"""mAdaFM modulation bank: per-modality restyling of frozen convolution kernels (ModalityBank, II-A).

For a frozen kernel W with bias b_conv, mu and sigma are the mean and standard deviation of each
(out, in) kernel slice over its spatial taps and W_norm = (W - mu) / sigma is kept frozen. Each
modality m owns Gamma_m, B_m (one number per (out, in) pair) and b_m (one per output channel):

    W_hat_m = Gamma_m * W_norm + B_m,    b_hat_m = b_conv + b_m.

Entries start at Gamma = sigma, B = mu, b = 0, which reproduces the pretrained convolution
(bit for bit: the kernel is computed as W + (Gamma - sigma) * W_norm + (B - mu), the same function).
Typical use::

    modulate(generator, target="resblocks")     # freeze G, wrap the chosen convolutions
    add_modality(generator, "t2")               # a new bank entry, the only trainable part
    set_modality(generator, "t2")               # forward now uses the t2 entry
    optimizer = torch.optim.Adam(bank_parameters(generator, "t2"))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from .generator import ResnetBlock

BANK_FIELDS = ("gamma", "beta", "bias")
TARGETS = ("resblocks", "all")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"a modality name must be a non-empty string without '.', got {name!r}")


class MAdaFMConv(nn.Module):
    """A frozen Conv/ConvTranspose (1-3D) whose kernel is restyled by the active modality's bank entry.

    The wrapped layer is kept as `conv` (stride, padding, padding_mode, dilation, groups and
    output_padding apply unchanged). Bank entries have the weight's layout with the spatial
    taps reduced to 1: (C_out, C_in/groups, 1, ...) for a convolution, (C_in, C_out/groups, 1, ...)
    for a transposed convolution; the bias entry has C_out elements in both cases.
    """

    def __init__(self, conv: _ConvNd, eps: float = 1e-8) -> None:
        """
        Args:
            conv: the pretrained convolution; its parameters are frozen (requires_grad False).
            eps: lower bound of sigma, for constant (or single-tap) kernel slices.
        """
        super().__init__()
        if not isinstance(conv, _ConvNd):
            raise TypeError(f"MAdaFMConv wraps a torch convolution, got {type(conv).__name__}")
        conv.requires_grad_(False)
        self.conv = conv
        w = conv.weight.detach()
        taps = tuple(range(2, w.ndim))
        mean = w.mean(dim=taps, keepdim=True)
        std = w.std(dim=taps, keepdim=True, correction=0).clamp_min(eps)
        self.register_buffer("weight_mean", mean.clone())
        self.register_buffer("weight_std", std)
        self.register_buffer("weight_norm", (w - mean) / std)
        self.bank_gamma = nn.ParameterDict()
        self.bank_beta = nn.ParameterDict()
        self.bank_bias = nn.ParameterDict()
        self.active: str | None = None

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def modalities(self) -> tuple[str, ...]:
        return tuple(self.bank_gamma.keys())

    def entry_numel(self) -> int:
        """Bank parameters one modality adds to this layer."""
        return 2 * self.weight_mean.numel() + self.out_channels

    def add_modality(self, name: str, copy_from: str | None = None) -> None:
        """Add an entry initialised to reproduce the frozen layer (or copied from another entry)."""
        _check_name(name)
        if name in self.bank_gamma:
            raise ValueError(f"modality {name!r} already has a bank entry")
        if copy_from is None:
            gamma, beta = self.weight_std.clone(), self.weight_mean.clone()
            bias = self.weight_mean.new_zeros(self.out_channels)
        else:
            self._require(copy_from)
            gamma = self.bank_gamma[copy_from].detach().clone()
            beta = self.bank_beta[copy_from].detach().clone()
            bias = self.bank_bias[copy_from].detach().clone()
        self.bank_gamma[name] = nn.Parameter(gamma)
        self.bank_beta[name] = nn.Parameter(beta)
        self.bank_bias[name] = nn.Parameter(bias)

    def entry(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of one modality's entry, keyed gamma / beta / bias."""
        self._require(name)
        return {"gamma": self.bank_gamma[name], "beta": self.bank_beta[name], "bias": self.bank_bias[name]}

    def modulated_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_hat, b_hat) of modality `name`."""
        self._require(name)
        # Gamma * W_norm + B, written as W plus the entry's departure from (sigma, mu): the same
        # function and gradients, but an untrained entry gives back W bit for bit.
        gamma, beta = self.bank_gamma[name], self.bank_beta[name]
        weight = self.conv.weight + (gamma - self.weight_std) * self.weight_norm + (beta - self.weight_mean)
        bias = self.bank_bias[name] if self.conv.bias is None else self.conv.bias + self.bank_bias[name]
        return weight, bias

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        if self.active is None:
            raise RuntimeError(
                f"no modality selected for this modulated convolution; call set_modality(model, name) "
                f"with one of {list(self.modalities())}"
            )
        weight, bias = self.modulated_weight(self.active)
        return functional_call(self.conv, {"weight": weight, "bias": bias}, (x, *args))

    def _require(self, name: str) -> None:
        if name not in self.bank_gamma:
            raise KeyError(f"unknown modality {name!r}; the bank holds {list(self.modalities())}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # A full state dict may carry entries this module has not seen yet: create them first.
        head = prefix + "bank_gamma."
        for key in state_dict:
            if key.startswith(head) and key[len(head) :] not in self.bank_gamma:
                self.add_modality(key[len(head) :])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities())}, active={self.active!r}"


def modulated_convs(model: nn.Module) -> list[tuple[str, MAdaFMConv]]:
    """(qualified name, layer) of every modulated convolution in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MAdaFMConv)]


def _key(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _layers(model: nn.Module) -> list[tuple[str, MAdaFMConv]]:
    layers = modulated_convs(model)
    if not layers:
        raise ValueError("the model has no modulated convolution; call modulate(model) first")
    return layers


def modulate(
    model: nn.Module,
    target: str | Callable[[str, _ConvNd], bool] = "resblocks",
    modalities: tuple[str, ...] | list[str] = (),
    eps: float = 1e-8,
) -> nn.Module:
    """Wrap the chosen convolutions of `model` in `MAdaFMConv`, in place, and freeze everything else.

    Args:
        model: a pretrained network (e.g. `ResnetGenerator`); must not be modulated already.
        target: "resblocks" = the two 3-wide convolutions of every `ResnetBlock` (the reference
            code); "all" = every convolution and transposed convolution (the paper's text); or a
            predicate (qualified name, conv) -> bool.
        modalities: bank entries to add straight away.
        eps: lower bound of the kernel standard deviation.

    Returns:
        the same `model`, with every non-bank parameter's requires_grad set to False.
    """
    if modulated_convs(model):
        raise ValueError("the model is already modulated")
    if isinstance(model, _ConvNd):
        raise ValueError("modulate() swaps convolutions inside a model; wrap a bare layer with MAdaFMConv(conv)")
    if callable(target):
        chosen = target
    elif target == "all":
        chosen = lambda name, conv: True  # noqa: E731
    elif target == "resblocks":
        inside = {id(c) for b in model.modules() if isinstance(b, ResnetBlock) for c in b.modules()}
        chosen = lambda name, conv: id(conv) in inside  # noqa: E731
    else:
        raise ValueError(f"target must be one of {TARGETS} or a predicate, got {target!r}")

    swaps = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, _ConvNd) and chosen(name, child):
                swaps.append((parent, child_name, child))
    if not swaps:
        raise ValueError(f"target {target!r} selected no convolution in {type(model).__name__}")
    model.requires_grad_(False)
    for parent, child_name, conv in swaps:
        setattr(parent, child_name, MAdaFMConv(conv, eps=eps))
    for name in modalities:
        add_modality(model, name)
    return model


def modalities(model: nn.Module) -> tuple[str, ...]:
    """Names of the bank's modalities, in the order they were added."""
    return _layers(model)[0][1].modalities()


def add_modality(model: nn.Module, name: str, copy_from: str | None = None) -> list[nn.Parameter]:
    """Add a bank entry for `name` to every modulated convolution; returns its (trainable) parameters.

    A new entry reproduces the pretrained network; with `copy_from` it starts as that modality's.
    """
    layers = _layers(model)
    if name in layers[0][1].bank_gamma:
        raise ValueError(f"modality {name!r} already has a bank entry")
    for _, layer in layers:
        layer.add_modality(name, copy_from=copy_from)
    return bank_parameters(model, name)


def set_modality(model: nn.Module, name: str | None) -> None:
    """Make `name`'s entry the one every modulated convolution uses (None: no modality selected)."""
    layers = _layers(model)
    if name is not None:
        layers[0][1]._require(name)
    for _, layer in layers:
        layer.active = name


def bank_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of `name`'s bank entry (to hand to an optimizer), in module order."""
    return [p for _, layer in _layers(model) for p in layer.entry(name).values()]


def bank_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A copy of `name`'s bank entry, keyed "<layer>.gamma|beta|bias" (no modality in the keys)."""
    return {
        _key(path, field): p.detach().clone()
        for path, layer in _layers(model)
        for field, p in layer.entry(name).items()
    }


def load_bank_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load a `bank_state_dict` into `name`'s entry, adding the modality if it is new."""
    layers = _layers(model)
    expected = {_key(path, field): (layer, field) for path, layer in layers for field in BANK_FIELDS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"bank state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, (layer, field) in expected.items():
        shape = tuple(layer.weight_mean.shape) if field != "bias" else (layer.out_channels,)
        if tuple(state[key].shape) != shape:
            raise ValueError(f"bank state {key}: shape {tuple(state[key].shape)}, expected {tuple(shape)}")
    if name not in layers[0][1].bank_gamma:
        add_modality(model, name)
    with torch.no_grad():
        for key, (layer, field) in expected.items():
            layer.entry(name)[field].copy_(state[key])


def frozen_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without any bank entry: the frozen network (weights, W_norm, mu, sigma)."""
    prefixes = tuple(_key(path, f"bank_{field}.") for path, _ in modulated_convs(model) for field in BANK_FIELDS)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def count_parameters(model: nn.Module, name: str | None = None) -> dict[str, int | float]:
    """Parameter counts: "bank" (one modality's entry), "bank_total" (all entries), "frozen"
    (every other parameter), "ratio" = bank / frozen, "modalities" (number of entries).

    With `name` the bank count is that entry's (KeyError if unknown); without, one entry's size.
    Works on an unmodulated model too (bank 0).
    """
    layers = modulated_convs(model)
    banks = [d for _, layer in layers for d in (layer.bank_gamma, layer.bank_beta, layer.bank_bias)]
    bank_ids = {id(p) for d in banks for p in d.values()}
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in bank_ids)
    bank_total = sum(p.numel() for p in model.parameters() if id(p) in bank_ids)
    if name is not None:
        bank = sum(p.numel() for p in bank_parameters(model, name))
    else:
        bank = sum(layer.entry_numel() for _, layer in layers)
    return {
        "bank": bank,
        "bank_total": bank_total,
        "frozen": frozen,
        "ratio": bank / frozen if frozen else float("nan"),
        "modalities": len(layers[0][1].modalities()) if layers else 0,
    }
