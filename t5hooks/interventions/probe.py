"""A linear probe at a hook point: reads the activation, leaves it unchanged, returns its predictions."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearProbe(nn.Module):
    """`(x, {output: x @ W.T + b})`: a classification (logits `[..., n_outputs]`) or regression head.

    `detach_input` (default) stops the probe's loss from reaching the model even when the model trains.
    """

    def __init__(
        self,
        d_in: int,
        n_outputs: int,
        *,
        output: str = "probe",
        detach_input: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, n_outputs, dtype=dtype, device=device)
        self.output = output
        self.detach_input = detach_input

    def predict(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., n_outputs]
        if self.detach_input:
            x = x.detach()
        return self.linear(x.to(self.linear.weight.dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return x, {self.output: self.predict(x)}
