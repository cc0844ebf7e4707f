"""The operations the models are built from: linear layers whose weights may be stored as fp8,
and one function per fused operation (each picks custom op / Triton / torch inside)."""
