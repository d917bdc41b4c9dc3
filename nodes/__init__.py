"""ComfyUI node classes of the Lens pack (legacy V1 registration).

Node ids are frozen: they are stored in every saved workflow as ``type`` / ``class_type``. Display
names may change. Importing this package does no torch work and touches no files.
"""

from .latent import LensNodesEmptyLatent, LensNodesResolution
from .loaders import LensNodesDiTLoader, LensNodesTextEncoderLoader, LensNodesVAELoader
from .lora import LensNodesLoRALoader
from .sampler import LensNodesSampler
from .text_encode import LensNodesTextEncode
from .vae_nodes import LensNodesVAEDecode, LensNodesVAEEncode

NODE_CLASS_MAPPINGS = {
    "LensNodesDiTLoader": LensNodesDiTLoader,
    "LensNodesTextEncoderLoader": LensNodesTextEncoderLoader,
    "LensNodesTextEncode": LensNodesTextEncode,
    "LensNodesSampler": LensNodesSampler,
    "LensNodesVAELoader": LensNodesVAELoader,
    "LensNodesVAEDecode": LensNodesVAEDecode,
    "LensNodesVAEEncode": LensNodesVAEEncode,
    "LensNodesResolution": LensNodesResolution,
    "LensNodesEmptyLatent": LensNodesEmptyLatent,
    "LensNodesLoRALoader": LensNodesLoRALoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LensNodesDiTLoader": "LensLoader",
    "LensNodesTextEncoderLoader": "GPT-OSS Loader",
    "LensNodesTextEncode": "GPT-OSS TextEncode",
    "LensNodesSampler": "MMDiT Sampler",
    "LensNodesVAELoader": "FLUX2 VAE Loader",
    "LensNodesVAEDecode": "FLUX2 VAE Decode",
    "LensNodesVAEEncode": "FLUX2 VAE Encode",
    "LensNodesResolution": "Lens Resolution",
    "LensNodesEmptyLatent": "Lens Empty Latent",
    "LensNodesLoRALoader": "Lens LoRA Loader",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
