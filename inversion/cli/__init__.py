"""The command line: a config file of concepts (``config``), its model (``models``), the run (``run``)."""
