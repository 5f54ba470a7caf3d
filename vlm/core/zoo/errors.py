"""Errors the zoo raises, worded so the message alone tells the user what to do."""

from collections.abc import Iterable

from huggingface_hub import constants


class UnknownModelError(ValueError):
    """A zoo name that no entry matches; the message lists the names that exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


class CheckpointMissingError(RuntimeError):
    """Pretrained files were asked for but are not on disk and cannot be fetched.

    The message is one line (it ends up in Hydra/Lightning logs and multirun summaries)
    naming the checkpoint, where it was looked for, and the two ways out.
    """

    def __init__(self, message: str, hub_id: str) -> None:
        super().__init__(message)
        self.hub_id = hub_id

    @classmethod
    def for_hub_id(cls, hub_id: str, config_key: str) -> "CheckpointMissingError":
        """``config_key`` is the setting that avoids the download: a ``*.pretrained`` flag is
        switched off, any other key (e.g. ``tokenizer.name``) is set to null."""
        value = "false" if config_key.endswith("pretrained") else "null"
        return cls(
            f"checkpoint {hub_id!r} is not in the local HF cache "
            f"(HF_HUB_CACHE={constants.HF_HUB_CACHE}): run `hf download {hub_id}` "
            f"on a machine with network, or set {config_key}={value}",
            hub_id,
        )
