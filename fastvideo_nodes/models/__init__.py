"""The networks: Wan2.1 DiT, Wan VAE, UMT5 text encoder (loaders live in `loading/`)."""
