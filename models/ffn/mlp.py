"""Dense feed-forward network: x -> act(x W_up) W_down, with gated variants (glu, swiglu)."""
from __future__ import annotations

import torch
from torch import nn

from models.config import FFNConfig
from models.ffn.activations import activation, is_gated


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C). Returns (y, aux) like every FFN; aux is 0 for a dense MLP."""

    def __init__(self, n_embd: int, cfg: FFNConfig, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.cfg = cfg
        width = cfg.up_dim * (2 if is_gated(cfg.non_linearity) else 1)
        self.c_fc = nn.Linear(n_embd, width, bias=bias)         # rows [value | gate] when gated
        self.c_proj = nn.Linear(cfg.up_dim, n_embd, bias=bias)
        self.c_proj.residual_scale = True        # GPT-2 init: scaled by 1/sqrt(2 n_layer)
        self.act = activation(cfg.non_linearity)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.drop(self.c_proj(self.act(self.c_fc(x))))      # (B, T, C)
        return y, x.new_zeros(())

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The decode step's FFN (models/decode.py): (B, 1, C) -> (B, 1, C), no aux term."""
        return self.c_proj(self.act(self.c_fc(x)))
