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
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    mask = j < n_pairs
    base = row * n_pairs * 2
    xe = tl.load(x_ptr + base + 2 * j, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + base + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=0) / (2 * n_pairs) + eps)
    xe = xe * r * tl.load(w_ptr + 2 * j, mask=mask, other=0.0).to(tl.float32)
    xo = xo * r * tl.load(w_ptr + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    angle = (row % seq_len) * half_d + j % half_d
    c = tl.load(cos_ptr + angle, mask=mask, other=0.0)
    s = tl.load(sin_ptr + angle, mask=mask, other=0.0)
    tl.store(y_ptr + base + 2 * j, (xe * c - xo * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + base + 2 * j + 1, (xe * s + xo * c).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_affine_kernel(x_ptr, a_ptr, b_ptr, y_ptr, seq_len, n_cols, a_per_batch, b_per_batch, eps,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    y = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    batch = row // seq_len
    a = tl.load(a_ptr + tl.where(a_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + tl.where(b_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * n_cols + cols, (y * a + b).to(y_ptr.dtype.element_ty), mask=mask)


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
