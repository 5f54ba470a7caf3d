"""Task YAMLs in lmms-eval's own format, one folder each (the plugin's ``tasks`` folder)."""
