"""The built-in readers (see :mod:`blockbuster.io.registry`)."""
