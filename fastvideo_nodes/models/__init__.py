"""Wan2.1 models (DiT, VAE, UMT5 text encoder) and their loaders."""
