"""The Triton jit kernels themselves, and the Triton helpers kernels share. Importing this module
imports Triton, so only `triton_kernels._jit()` and the attention kernels (which need Triton
anyway) import it."""
import functools

import triton
import triton.language as tl


@functools.cache
def tensor_descriptor():
    """Host-side TMA descriptors (Triton 3.4+); None on older Triton, whose callers run pointer loads."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor
    except ImportError:
        return None


@triton.jit
def rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, seq_len, n_pairs, half_d, eps,
                         BLOCK: tl.constexpr):
    """One token: its row read once as contiguous pairs (split into the pair's two halves in registers:
    strided even/odd loads ran at ~1.3 TB/s on an H200, this at 2.1–3)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, 2 * BLOCK)
    inside = offs < 2 * n_pairs
    base = row * n_pairs * 2
    x = tl.load(x_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / (2 * n_pairs) + eps)
    x = x * r * tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, [BLOCK, 2]))
    j = tl.arange(0, BLOCK)
    angle = (row % seq_len) * half_d + j % half_d
    c = tl.load(cos_ptr + angle, mask=j < n_pairs, other=0.0)
    s = tl.load(sin_ptr + angle, mask=j < n_pairs, other=0.0)
    y = tl.reshape(tl.join(xe * c - xo * s, xe * s + xo * c), [2 * BLOCK])
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _layer_norm_ab_store(x, row, batch, cols, mask, n_cols, a_ptr, b_ptr, y_ptr, a_per_batch, b_per_batch, eps):
    """LayerNorm of one float32 row x, ·a + b (each [C], or one row per sample), stored in y's dtype."""
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    y = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    a = tl.load(a_ptr + tl.where(a_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + tl.where(b_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * n_cols + cols, (y * a + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_affine_kernel(x_ptr, a_ptr, b_ptr, y_ptr, seq_len, n_cols, a_per_batch, b_per_batch, eps,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    _layer_norm_ab_store(x, row, row // seq_len, cols, mask, n_cols, a_ptr, b_ptr, y_ptr, a_per_batch, b_per_batch,
                         eps)


@triton.jit
def residual_layer_norm_kernel(x_ptr, y_ptr, g_ptr, a_ptr, b_ptr, xo_ptr, h_ptr, seq_len, n_cols,
                               g_per_batch, a_per_batch, b_per_batch, eps,
                               BLOCK: tl.constexpr, GATED: tl.constexpr):
    """One token: x + y·g (the float32 residual stream, written back) and LayerNorm of it ·a + b in h,
    from one read of x and y (Inductor's kernel for the same math read the row twice at 5,120 wide)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    batch = row // seq_len
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        x += y * tl.load(g_ptr + tl.where(g_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
    else:
        x += y
    tl.store(xo_ptr + row * n_cols + cols, x, mask=mask)
    _layer_norm_ab_store(x, row, batch, cols, mask, n_cols, a_ptr, b_ptr, h_ptr, a_per_batch, b_per_batch, eps)


@triton.jit
def rms_norm_silu_kernel(x_ptr, g_ptr, y_ptr, n_rows, n_cols, scale, eps,
                         BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr, SILU: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    offs = rows * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
    y = x / tl.maximum(norm, eps) * scale * g
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
