"""The VAE configs of the published models, for the memory planner (diffusers' config.json of each release)."""

from __future__ import annotations

from typing import Any


def autoencoder_kl(latent_channels: int, quant_convs: bool, class_name: str = "AutoencoderKL") -> dict[str, Any]:
    """The LDM autoencoder at its released size: SD1.5, SDXL (4 latent channels), Flux.1 and Z-Image (16),
    Flux.2 (32, with its batch-norm statistics)."""
    return {"_class_name": class_name, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "latent_channels": latent_channels, "norm_num_groups": 32, "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_quant_conv": quant_convs, "use_post_quant_conv": quant_convs}


SD_VAE = autoencoder_kl(4, True)
FLUX_VAE = autoencoder_kl(16, False)
FLUX2_VAE = autoencoder_kl(32, False, "AutoencoderKLFlux2")
QWEN_IMAGE_VAE = {"_class_name": "AutoencoderKLQwenImage", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
                  "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True]}
