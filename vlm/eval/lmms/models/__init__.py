"""The models this package adds to lmms-eval, through its ``lmms_eval.models`` entry-point group
(``pyproject.toml``)."""


def manifest():
    """``--model vlm_lab`` (not named ``vlm_lab``: importing the submodule rebinds that name). A
    callable that imports lmms-eval only when called: lmms-eval loads its entry points on every
    ``import lmms_eval.models``, from inside that unfinished import, so this module stays free of
    lmms-eval (no import cycle, whoever imports it first) and of torch."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest("vlm_lab", simple_class_path="vlm.eval.lmms.models.vlm_lab.VLMLab")
