"""A ControlNet as one .safetensors in the original `control_model.*` layout, read back by diffusers' own loader."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from difftrain.cli import main
from difftrain.models.single_file import SingleFileError, save_controlnet_single_file

# Names of lllyasviel's cldm ControlNet (the files A1111's extension and ComfyUI load), for a
# two-level UNet: time embedding, the hint encoder's first and last convolutions, the UNet
# encoder's resnets, attention and downsampler, a zero convolution per encoder output, the
# middle's attention and its zero convolution.
ORIGINAL_NAMES = [
    "control_model.time_embed.0.weight", "control_model.time_embed.2.bias",
    "control_model.input_hint_block.0.weight", "control_model.input_hint_block.12.weight",
    "control_model.input_hint_block.14.weight", "control_model.input_blocks.0.0.weight",
    "control_model.input_blocks.1.0.in_layers.2.weight", "control_model.input_blocks.1.1.proj_in.weight",
    "control_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "control_model.input_blocks.2.0.op.weight",
    "control_model.zero_convs.0.0.weight", "control_model.zero_convs.3.0.bias",
    "control_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", "control_model.middle_block.2.out_layers.3.weight",
    "control_model.middle_block_out.0.weight",
]


@pytest.fixture
def controlnet():
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    net = ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          cross_attention_dim=32, layers_per_block=1, attention_head_dim=4, norm_num_groups=32)
    for module in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        torch.nn.init.normal_(module.weight)  # zero at init: random here, so a dropped tensor would show
    return net


def test_original_key_layout_and_diffusers_reads_it_back_exactly(controlnet, tmp_path):
    from diffusers import ControlNetModel

    controlnet.save_pretrained(tmp_path / "folder")
    path = save_controlnet_single_file(controlnet, tmp_path / "cn.safetensors", metadata={"base": "tiny"})
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert set(ORIGINAL_NAMES) <= keys
    assert all(key.startswith("control_model.") for key in keys) and len(keys) == len(controlnet.state_dict())
    assert metadata["base"] == "tiny"
    back = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "folder"), local_files_only=True)
    ours, theirs = controlnet.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_generate_loads_a_single_file_offline_as_a_controlnet_for_its_unet(controlnet, tmp_path, monkeypatch):
    """The config comes from the UNet it steers, not the Hub: diffusers would fetch SD 1.5's canny ControlNet's,
    which offline fails and for any other base has the wrong widths (this tiny one's, here)."""
    from diffusers import UNet2DConditionModel

    from difftrain.models.control import load_control

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                layers_per_block=1, attention_head_dim=4, norm_num_groups=32)
    path = save_controlnet_single_file(controlnet, tmp_path / "cn.safetensors")
    loaded = load_control(str(path), torch.float32, unet)
    ours, theirs = controlnet.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_cli_exports_a_folder_in_half_precision(controlnet, tmp_path, capsys):
    controlnet.save_pretrained(tmp_path / "folder")
    out = tmp_path / "cn-fp16.safetensors"
    assert main(["model", "export-controlnet", str(tmp_path / "folder"), str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        assert handle.get_tensor("control_model.zero_convs.0.0.weight").dtype == torch.float16
    assert "control_model" in capsys.readouterr().out
    assert main(["model", "export-controlnet", str(tmp_path / "folder"), str(tmp_path / "cn.ckpt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    # Over the folder's own weights: the model was gone (diffusers then loaded it as freshly initialised).
    weights = tmp_path / "folder" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    assert main(["model", "export-controlnet", str(tmp_path / "folder"), str(weights)]) == 2
    assert "is a file of the ControlNet being exported" in capsys.readouterr().err and weights.read_bytes() == before
    # Another kind of model: named by its class (it was a meta-tensor traceback after pages of warnings).
    from diffusers import T2IAdapter, UNet2DConditionModel

    UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         layers_per_block=1, attention_head_dim=4, norm_num_groups=32).save_pretrained(tmp_path / "unet")
    T2IAdapter(channels=[32, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(tmp_path / "adapter")
    for name, said in (("unet", "holds a UNet2DConditionModel, not a ControlNet"), ("adapter", "is a T2I-Adapter")):
        assert main(["model", "export-controlnet", str(tmp_path / name), str(tmp_path / f"{name}.safetensors")]) == 2
        assert said in capsys.readouterr().err


def test_weights_outside_the_layout_are_refused_not_dropped(controlnet):
    from difftrain.models.single_file import controlnet_to_ldm

    with pytest.raises(SingleFileError, match="no Stable Diffusion"):
        controlnet_to_ldm({**controlnet.state_dict(), "extra.weight": torch.zeros(1)})


def test_a_condition_encoder_of_another_depth_is_refused(tmp_path):
    from diffusers import ControlNetModel

    net = ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          cross_attention_dim=32, layers_per_block=1, attention_head_dim=4, norm_num_groups=32,
                          conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(SingleFileError, match="the original layout has 6"):
        save_controlnet_single_file(net, tmp_path / "cn.safetensors")
