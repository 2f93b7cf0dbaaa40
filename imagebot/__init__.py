"""imagebot: a self-hosted Telegram bot that generates and edits images with hosted AI models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imagebot")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+unknown"
