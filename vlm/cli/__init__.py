"""Console entry points; every one is a Hydra app over the ``conf/`` tree (see ``common``)."""
