"""``llava``: plain LLaVA-1.5 (one vision tower, mlp2x_gelu connector, a causal LLM)."""
