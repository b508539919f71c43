"""Twins of ``torch.nn`` modules. Each subclasses the torch module, so parameters, ``__init__``
arguments and state_dicts are identical (load one into the other unchanged), and only
``forward`` runs fastgpt's kernels."""

from __future__ import annotations

import torch

from fastgpt import functional as F

__all__ = ["Linear", "LayerNorm", "GELU", "CrossEntropyLoss"]


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose product is fastgpt's (fp32 on oneDNN where that is faster)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` running fastgpt's fused kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_add(
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(input + residual), input + residual)`` in one fused pass."""
        return F.add_layer_norm(
            input, residual, self.normalized_shape, self.weight, self.bias, self.eps
        )


class GELU(torch.nn.GELU):
    """``torch.nn.GELU`` running fastgpt's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, approximate=self.approximate)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` running fastgpt's kernels."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
