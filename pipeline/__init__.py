"""Planning, scheduling, reading, writing and the CLI of loraforge."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
