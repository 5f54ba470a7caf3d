"""vlm-lab as an lmms-eval plugin, with no edit of lmms-eval: ``LMMS_EVAL_PLUGINS=vlm.eval.lmms``
makes it import ``models`` (whose ``AVAILABLE_MODELS`` adds ``--model vlm_lab``), and ``tasks``
holds task YAMLs in its format (``--include_path vlm/eval/lmms/tasks``: lmms-eval 0.7.3 adds a
plugin's tasks only after it has looked the task names up)."""
