"""Regional ``torch.compile`` of a model's parts (``family.compile``).

Each repeated block of a part is compiled, not the part as a whole: identical blocks share one
compiled graph (compile time is one block's, not the depth's), and the explicit Python around
them (CALM's composition loop, layer-fusion taps, no_grad regions, checkpointing) stays eager
instead of breaking the graph. ``nn.Module.compile`` works in place, so state-dict keys and
checkpoints are unchanged.

Training steps compile once per shape. Decoding (``generate``) runs eager: transformers' KV
caches guard on each layer's state, which would recompile every decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import nn


@dataclass
class CompileConf:
    parts: list[str] = field(default_factory=list)  # e.g. [vision_tower], [anchor, augmenting, calm]
    backend: str = "inductor"
    mode: str | None = None  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    dynamic: bool | None = None
    fullgraph: bool = False


def compile_conf(cfg: dict | None, parts: list[str]) -> CompileConf:
    """``cfg`` checked against its keys and the model's ``parts``: a misspelt name is a one-line
    error naming the known ones, raised when the module is built, not at the first step."""
    cfg = dict(cfg or {})
    known = [f.name for f in fields(CompileConf)]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"family.compile has unknown keys {unknown}: known {known}")
    conf = CompileConf(**cfg)
    unknown = sorted(set(conf.parts) - set(parts))
    if unknown:
        raise ValueError(f"family.compile.parts has unknown parts {unknown}: known {sorted(parts)}")
    return conf


def regions(part: nn.Module, blocks: nn.ModuleList | None) -> list[nn.Module]:
    """What is compiled for a part: its blocks, else the members of a module container, else
    the part itself."""
    if blocks is not None:
        return list(blocks)
    if isinstance(part, nn.ModuleDict | nn.ModuleList):
        return list(part.children())
    return [part]


def compile_parts(model: nn.Module, cfg: CompileConf) -> None:
    """Compile the named parts of ``model`` (its ``parts()`` and their ``blocks``) in place."""
    options = {"backend": cfg.backend, "mode": cfg.mode, "dynamic": cfg.dynamic, "fullgraph": cfg.fullgraph}
    parts = model.parts()
    for name in cfg.parts:
        for module in regions(parts[name], model.blocks(name)):
            module.compile(**options)
