"""T2I-Adapter: a small network that turns the conditioning image into one feature map per UNet
level, added inside the frozen UNet's down blocks (diffusers' `down_intrablock_additional_residuals`).

It is the ControlNet method with another network: the same data (conditioning images found,
cropped, flipped and cached with their images), the same frozen parts, validation pairs,
agreement scores, resume and outputs. An adapter is ~1/10 of a ControlNet's size and runs
once per image rather than once per sampling step.
"""

from __future__ import annotations

import torch

from difftrain.methods.controlnet import ControlNetTraining


class T2IAdapterTraining(ControlNetTraining):
    name = "t2i_adapter"
    kind = "t2i-adapter"
    scale_argument = "adapter_conditioning_scale"

    def new_network(self):
        from difftrain.models.control import adapter_for_unet

        return adapter_for_unet(self.unet, len(self.vae.config.block_out_channels), self.control.adapter_type,
                                self.control.num_res_blocks)

    def speed_modules(self) -> dict[str, torch.nn.Module]:
        # diffusers' adapters have no gradient checkpointing; the UNet the gradients pass through does.
        return {"unet": self.unet}

    folds_scale = False  # its features leave through residual blocks, not one linear layer

    def describe(self) -> list[str]:
        scale = self.control.conditioning_scale
        note = [f"t2i_adapter.conditioning_scale {scale:g} is recorded in difftrain.json only: set the adapter's "
                f"weight to {scale:g} in diffusers, A1111 or ComfyUI"] if scale != 1.0 else []
        return super().describe() + note

    def residuals(self, net, x, t, embeds, condition) -> dict:
        scale = self.control.conditioning_scale
        # A fresh list per call: the UNet pops its entries as it uses them.
        return {"down_intrablock_additional_residuals": [feature * scale for feature in net(condition)]}
