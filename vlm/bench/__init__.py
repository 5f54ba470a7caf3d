"""Throughput, memory, MFU and generation latency of any experiment config (``vlm-bench``)."""
