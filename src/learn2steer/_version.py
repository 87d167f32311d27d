"""The package version, in its own module so that any module can import it without importing the package face."""

__version__ = "0.4.0"
