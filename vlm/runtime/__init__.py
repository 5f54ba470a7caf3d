"""The harness around a run: task wrapper, loggers, callbacks, trainer, checkpoint writes, config I/O.

Entry points in ``vlm.cli`` use these; model code (``core`` models, families) never does.
"""
