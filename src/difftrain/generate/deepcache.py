"""A feature cache across adjacent denoising steps (DeepCache, Ma et al., CVPR 2024), opt-in.

The UNet's deep features change slowly from one step to the next; its shallowest blocks
carry the detail. Every `interval`-th step runs the whole UNet and keeps what enters its
last up block; the steps between run only the input convolution, the first down block,
the last up block (on the kept features, with the fresh skips) and the output
convolutions: a fraction of the FLOPs. The original paper reports ~2.3x on SD 1.5 at
interval 5 with a small quality loss; `benchmarks/deepcache.py` measures it here.

Written by us rather than taken from the DeepCache package: that package patches
diffusers' pipeline classes by version, while this wraps one UNet call and works under
every pipeline that calls the UNet once per step (text2image, img2img).
"""

from __future__ import annotations

import torch


class DeepCache:
    """Wraps `unet.forward`; `reset()` before each generation starts a fresh cache."""

    def __init__(self, unet, interval: int):
        if interval < 1:
            raise ValueError("the DeepCache interval is at least 1 (1 = every step runs the whole UNet)")
        self.unet, self.interval = unet, interval
        self.calls, self.deep, self.full_calls = 0, None, 0
        self._forward = unet.forward
        unet.up_blocks[-1].register_forward_pre_hook(self._keep, with_kwargs=True)
        unet.forward = self.forward
        unet.feature_cache = self  # what draw() tells when the conditioning changes mid-draw (refresh)

    def refresh(self) -> None:
        """The next call runs the whole UNet: the conditioning changed (a prompt edit's next span, an alternation),
        and the kept deep features were made from the old one."""
        self.deep = None

    def reset(self) -> None:
        self.calls, self.deep = 0, None
        if self.unet.forward != self.forward:
            # Under --cpu-offload the pipeline re-installs accelerate's offload hook after every call
            # (maybe_free_model_hooks): removing it puts back the forward the hook first wrapped, which
            # is the UNet's own, so this wrapper was gone from the second generation on. Wrapped again,
            # around the new hook.
            self._forward = self.unet.forward
            self.unet.forward = self.forward

    def _keep(self, module, args, kwargs):
        self.deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        full = self.calls % self.interval == 0 or self.deep is None or self.deep.shape[0] != sample.shape[0]
        self.calls += 1
        if full:
            self.full_calls += 1
            return self._forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        out = self._shallow(sample, timestep, encoder_hidden_states)
        return (out,) if kwargs.get("return_dict") is False else _output(out)

    def _shallow(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        skips = (hidden,)
        first = unet.down_blocks[0]
        if getattr(first, "has_cross_attention", False):
            hidden, more = first(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, more = first(hidden_states=hidden, temb=emb)
        skips += more
        last = unet.up_blocks[-1]
        # The last up block takes the first skips (the rest went to the blocks now skipped).
        skips = skips[:len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            hidden = last(hidden_states=self.deep, temb=emb, res_hidden_states_tuple=skips,
                          encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = last(hidden_states=self.deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def _output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)
