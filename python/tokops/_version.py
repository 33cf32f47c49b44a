# The one place the version lives (setup.py reads it with a regex).
__version__ = "0.1.0"
