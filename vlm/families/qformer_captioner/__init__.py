"""Q-Former captioner: CLIP -> Q-Former (queries + global token) -> cross-attending GPT decoder."""
