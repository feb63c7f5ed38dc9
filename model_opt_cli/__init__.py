"""The ``model-opt`` command line. Importing it imports neither torch nor any backend."""
