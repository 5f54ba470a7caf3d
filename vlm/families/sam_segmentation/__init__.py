"""VLM-to-SAM segmentation (ModifiedLISA / LISA): separate-encoder and VLM modes, fused or
[SEG]-token prompts, SAM's mask decoder."""
