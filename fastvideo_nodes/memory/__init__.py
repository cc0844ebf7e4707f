"""What lives on the GPU: block offload, and the out-of-memory message."""
