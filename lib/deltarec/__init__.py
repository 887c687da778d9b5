"""deltarec: keep recommendation models fresh from Delta Lake behaviour tables."""
__version__ = "0.1.0"
