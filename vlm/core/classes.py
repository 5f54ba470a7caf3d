"""The classes a config or a checkpoint may name, known by their import path.

A shared checkpoint names its LightningModule, its model and its objective; a config names its
model and objective. Those names are looked up here, never imported: a file from elsewhere can
only pick among the classes this code base (and what the user imported) defines. Every subclass
of a :class:`Known` base registers itself when its module is imported; every entry point
imports the families package (``vlm/families/__init__.py``), which imports each family.
"""

from __future__ import annotations

KNOWN: dict[str, type] = {}


def name_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Known:
    """Mixin: each class that derives from it is in :data:`KNOWN`, except an abstract base that
    says ``nameable = False`` in its own body."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("nameable", True):
            KNOWN[name_of(cls)] = cls


def known_class(name: str | None, base: type, what: str) -> type:
    """The registered subclass of ``base`` called ``name``; a one-line error otherwise."""
    if not name:
        raise ValueError(f"{what} is missing: it names a {base.__name__} class")
    cls = KNOWN.get(name)
    if cls is None or not issubclass(cls, base):
        choices = sorted(n for n, c in KNOWN.items() if issubclass(c, base))
        raise ValueError(f"{what} {name!r} is not a known {base.__name__}: choose from {', '.join(choices)}")
    return cls
