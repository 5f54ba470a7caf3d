"""SAM's side of the segmenter: transformers' ``SamModel`` (tiny random, real ViT-B random, or
``facebook/sam-vit-*`` weights), called below its top level.

``SamModel.forward`` takes image embeddings but builds its sparse prompts only from points and
boxes through the prompt encoder; a learned prompt (the ``[SEG]`` state through the
TextSAMConnector) has no way in there. So the mask decoder is called directly with our image
embeddings, SAM's image-wide positional encoding, our sparse embeddings and the prompt
encoder's no-mask dense embedding: exactly what ``SamModel.forward`` hands it for a prompt
without a mask input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from transformers import SamConfig, SamModel

from vlm.core.zoo.hub import load_pretrained
from vlm.core.zoo.registry import IMAGENET_MEAN, IMAGENET_STD, ImageSpec

# The tiny preset: every width of SAM-B's decoder divided by 4, a 2-block image encoder with
# windowed + global attention at 64 px, 16 x 16 image embedding, 64 x 64 low-res masks.
TINY = {
    "vision_config": {
        "hidden_size": 32, "output_channels": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 64, "patch_size": 4, "window_size": 4, "global_attn_indexes": [1],
        "num_pos_feats": 32, "mlp_dim": 128,
    },
    "prompt_encoder_config": {"hidden_size": 64, "image_size": 64, "patch_size": 4},
    "mask_decoder_config": {
        "hidden_size": 64, "mlp_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "iou_head_hidden_dim": 64,
    },
}  # fmt: skip


def build_sam(
    name: str = "facebook/sam-vit-base", pretrained: bool = False, preset: str = "tiny"
) -> SamModel:
    """``preset="tiny"``: :data:`TINY`; ``"real"``: SAM ViT-B's architecture (``SamConfig()``'s
    defaults), random init; ``pretrained``: ``name``'s weights from the local HF cache."""
    if pretrained:
        return load_pretrained(
            lambda src: SamModel.from_pretrained(src, dtype=torch.float32), name, "sam.pretrained"
        )
    if preset not in ("tiny", "real"):
        raise ValueError(f"sam.preset must be 'tiny' or 'real', got {preset!r}")
    return SamModel(SamConfig(**TINY) if preset == "tiny" else SamConfig())


class SamHead(nn.Module):
    """SAM's prompt encoder (positional encoding, no-mask embedding) and mask decoder; its
    image encoder only with ``image_encoder="own"`` (otherwise it is never run, so not kept)."""

    def __init__(self, sam: SamModel, own_encoder: bool):
        super().__init__()
        if not own_encoder:
            sam.vision_encoder = None
        self.sam = sam
        cfg = sam.config
        self.dim = cfg.mask_decoder_config.hidden_size
        self.embedding_size = cfg.prompt_encoder_config.image_embedding_size
        self.image_spec = ImageSpec(cfg.vision_config.image_size, IMAGENET_MEAN, IMAGENET_STD)

    @property
    def low_res_size(self) -> int:
        """The decoder's mask side: its two transposed convolutions upscale E by 4."""
        return 4 * self.embedding_size

    @property
    def image_encoder(self) -> nn.Module | None:
        return self.sam.vision_encoder

    def image_transform(self):
        """SAM's pixels, squashed to its square input (see ``squash_transform``'s reason)."""
        s = self.image_spec
        return v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize((s.size, s.size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(s.mean, s.std),
            ]
        )

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """SAM's own image embedding (B, dim, E, E)."""
        return self.sam.vision_encoder(pixel_values).last_hidden_state

    def forward(self, image_embeddings: Tensor, sparse: Tensor) -> Tensor:
        """(M, dim, E, E) image embeddings and (M, n, dim) prompts -> (M, 4E, 4E) mask logits,
        one mask per prompt (multimask output off)."""
        m = image_embeddings.shape[0]
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = dense.expand(m, -1, self.embedding_size, self.embedding_size)
        positions = self.sam.get_image_wide_positional_embeddings().expand(m, -1, -1, -1)
        masks, _ = self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=positions.to(image_embeddings.dtype),
            sparse_prompt_embeddings=sparse[:, None].to(image_embeddings.dtype),
            dense_prompt_embeddings=dense.to(image_embeddings.dtype),
            multimask_output=False,
        )
        return masks[:, 0, 0]
