"""Task YAMLs in lmms-eval's own format, one folder each: a package, so that setuptools ships them
(package data) and an installed copy's folder is ``vlm.eval.lmms.tasks.__path__[0]``."""
