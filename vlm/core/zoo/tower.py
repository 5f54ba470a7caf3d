"""The vision-tower interface every encoder in the zoo implements.

CALM, layer fusion and the dense connector read every block's output and CALM runs blocks
one at a time, so a tower exposes ``embed`` and ``run_block``, and ``forward`` is just that
loop. A tower returns hidden states only: pooling heads and final norms are never run. They stay
in the module, so its state dict is the hub checkpoint's key for key (an imported LLaVA exports
back unchanged), and recipes keep them frozen (:meth:`VisionTower.never_run`): a parameter that
never gets a gradient would stall DDP once a recipe unfreezes the tower.
"""

from torch import Tensor, nn

from vlm.core.zoo.registry import ImageSpec


class VisionTower(nn.Module):
    """A ViT seen as ``embed`` -> N blocks; hidden states are (B, T, D), T = prefix + patches.

    ``model`` is the wrapped HF/timm module, kept whole so its checkpoints load unchanged.
    """

    unused: tuple[str, ...] = ()  # dotted paths in ``model`` (modules or parameters) never run

    def __init__(
        self, name: str, model: nn.Module, image_spec: ImageSpec, hidden_size: int,
        num_prefix_tokens: int, num_patches: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.name = name
        self.model = model
        self.image_spec = image_spec
        self.hidden_size = hidden_size
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = num_patches

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def never_run(self) -> list[nn.Module | nn.Parameter]:
        """The wrapped model's pieces the block loop never reaches (``unused`` that exist)."""
        out = []
        for path in self.unused:
            parent_path, _, leaf = path.rpartition(".")
            piece = getattr(self.model.get_submodule(parent_path), leaf, None)
            if isinstance(piece, nn.Module | nn.Parameter):
                out.append(piece)
        return out

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> hidden_states[0] (B, T, D)."""
        raise NotImplementedError

    def run_block(self, i: int, h: Tensor) -> Tensor:
        """Block ``i`` (0-based): (B, T, D) -> (B, T, D)."""
        return self.blocks[i](h)

    def states(self, pixel_values: Tensor, upto: int) -> list[Tensor]:
        """[h0, ..., h_upto]: blocks past ``upto`` are never run. A composite tower (CALM)
        overrides this with its own loop; callers only see the states."""
        param = next(self.parameters())
        states = [self.embed(pixel_values.to(param.dtype))]
        for i in range(upto):
            states.append(self.run_block(i, states[-1]))
        return states

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """[h0, h1, ..., hN], each (B, T, D), as HF's ``hidden_states``."""
        return self.states(pixel_values, self.depth)
