"""vlm-lab as an lmms-eval plugin, with no edit of lmms-eval: the installed package's
``lmms_eval.models`` entry point adds ``--model vlm_lab`` (``models``), and ``tasks`` holds task
YAMLs in lmms-eval's format, passed as ``--include_path`` (lmms-eval 0.7.3 has no entry-point
group for tasks)."""
