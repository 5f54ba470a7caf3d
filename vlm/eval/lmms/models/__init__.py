"""The models this plugin adds, as lmms-eval's ``LMMS_EVAL_PLUGINS`` reads them: model name ->
class name in the module of the same name (``vlm_lab`` -> ``vlm_lab.VLMLab``)."""

AVAILABLE_MODELS = {"vlm_lab": "VLMLab"}
