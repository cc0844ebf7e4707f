"""Cheap previews of the latent during sampling: a linear map from the 16 Wan 2.1 latent
channels (model space) to RGB, the factors ComfyUI uses for Wan21 latents."""
from __future__ import annotations

import torch

WAN21_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]
WAN21_RGB_BIAS = [-0.1835, -0.0868, -0.3360]


def latent_to_rgb(x0: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """Model-space latents [1,16,T',h,w] → uint8 [h, w, 3] of one latent frame (CPU)."""
    z = x0[0, :, frame].float().cpu()  # [16, h, w]
    w = torch.tensor(WAN21_RGB_FACTORS)  # [16, 3]
    rgb = torch.einsum("chw,cr->hwr", z, w) + torch.tensor(WAN21_RGB_BIAS)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
