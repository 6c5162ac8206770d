"""The installed pytorch2jax version, in a module of its own so that any module can import
it without importing the package's other names."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pytorch2jax")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
