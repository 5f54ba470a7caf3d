"""CALM (Bansal et al. 2024) applied to vision: an anchor tower composed with an augmenting one."""
