"""VirNucPro: viral-read prediction with embeddings spread over mixed GPUs by a broker."""

__version__ = "0.1.0"
