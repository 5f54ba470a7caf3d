"""Connectors: vision features (B, P, D_v) -> LLM embedding space (B, P, D_llm).

Hydra builds them with ``_partial_: true``; the model completes the call with the widths it
knows from the zoo, so a connector file never repeats an encoder's or LLM's size.
"""

from __future__ import annotations

from torch import Tensor, nn


class Connector(nn.Module):
    """``linear`` (LLaVA-1) or ``mlp{depth}x_gelu`` (LLaVA-1.5: Linear, then GELU+Linear repeated)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu"):
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
        if depth < 1:
            raise ValueError(f"connector depth must be >= 1, got {depth}")
        if activation not in acts:
            raise ValueError(f"unknown connector activation '{activation}': choose from {list(acts)}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [acts[activation](), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_tokens(self, num_in: int) -> int:
        """Token count after the connector (unchanged here; pooling connectors override it)."""
        return num_in

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)
