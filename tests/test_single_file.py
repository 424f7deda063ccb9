"""The LDM single file we write loads back, bit for bit, through diffusers' own loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difftrain.models.single_file import (
    SingleFileError,
    load_single_file_components,
    save_single_file,
    to_ldm_state_dict,
    unet_to_ldm,
    vae_to_ldm,
)

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from difftrain.models.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_sf"), seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, local_files_only=True)


@pytest.fixture(scope="session")
def single_file(tiny_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    pipe = tiny_pipe
    return save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, path, metadata={"modelspec.title": "tiny"})


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def image(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    out = pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np", height=32, width=32)
    return out.images[0]


def test_every_weight_gets_an_ldm_name(tiny_pipe, single_file):
    counts = {name: len(getattr(tiny_pipe, name).state_dict()) for name in PARTS}
    with safe_open(single_file, framework="pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.text_model.",
    }
    for name, prefix in prefixes.items():
        assert sum(k.startswith(prefix) for k in keys) == counts[name], name
    assert len(keys) == sum(counts.values()) == 208 + 124 + 36
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.input_blocks.2.0.op.weight",  # the downsampler after level 0's one layer
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of the attention-free level
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in keys, key
    assert q.shape == (64, 64, 1, 1)  # LDM's VAE attention is 1x1 convs


def test_diffusers_pipeline_loads_our_file_bit_identical(tiny_pipe, tiny_dir, single_file):
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_single_file(
        str(single_file), config=str(tiny_dir), local_files_only=True, safety_checker=None
    )
    for name in PARTS:
        assert_same_weights(getattr(tiny_pipe, name), getattr(loaded, name))
    assert np.array_equal(image(tiny_pipe), image(loaded))


def test_per_component_loaders_and_load_sd_agree(tiny_pipe, tiny_dir, single_file):
    from difftrain.models.sd import load_sd

    models = load_single_file_components(single_file, tiny_dir)
    ours = load_sd(str(single_file), config=str(tiny_dir))
    for name in PARTS:
        assert_same_weights(getattr(tiny_pipe, name), models[name])
        assert_same_weights(getattr(tiny_pipe, name), getattr(ours, name))
    assert type(ours.scheduler).__name__ == "DDIMScheduler" and str(single_file) in ours.source


def test_sd2s_open_clip_encoder_is_written_in_open_clip_names_and_diffusers_reads_it_back(tiny_pipe, tmp_path):
    """SD 2.x files hold OpenCLIP's names (AUTOMATIC1111 tells an SD 2 file by them, ComfyUI's SD 2 loader reads
    only them); the SD 1.x layout there loaded only in diffusers. A gelu CLIP stands in for OpenCLIP ViT-H."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**tiny_pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    pipe = StableDiffusionPipeline(**{**tiny_pipe.components, "text_encoder": text_encoder})
    pipe.save_pretrained(tmp_path / "configs")
    path = save_single_file(pipe.unet, pipe.vae, text_encoder, tmp_path / "sd2.safetensors")
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # A1111's SD 2 test
    assert "cond_stage_model.model.positional_embedding" in keys and "cond_stage_model.model.ln_final.bias" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "configs"),
                                                      local_files_only=True, safety_checker=None)
    assert_same_weights(text_encoder, loaded.text_encoder)


def test_sd2s_dropped_last_open_clip_block_is_written_for_the_tools_that_build_all_24():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftrain.models.single_file import open_clip_to_ldm

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=23,
                                         num_attention_heads=2, hidden_act="gelu", vocab_size=100, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1))
    ldm = open_clip_to_ldm(model.state_dict())
    block = "cond_stage_model.model.transformer.resblocks."
    copied = [key for key in ldm if key.startswith(block + "23.")]
    assert len(copied) == 12 and all(torch.equal(ldm[key], ldm[key.replace(".23.", ".22.")]) for key in copied)
    back = convert_open_clip_checkpoint(model, ldm)  # diffusers skips block 23 by name, as in SD 2's own files
    back = {k.removeprefix("text_model."): v for k, v in back.items() if k != "text_projection.weight"}
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], value) for key, value in state.items())


def test_a_lora_run_on_a_single_file_base_records_its_config_and_generate_loads_it_offline(tiny_dir, single_file,
                                                                                           shapes_dir, tmp_path):
    """model.config describes a single-file base (offline diffusers could only guess a hub repo it lacks); the run's
    manifest keeps it, so `generate RUN` rebuilds the base as training loaded it."""
    from test_text2image import sd_config

    from difftrain.cli import main
    from difftrain.models.manifest import read_manifest

    config = sd_config(tmp_path, shapes_dir, single_file, model={"config": str(tiny_dir)},
                       lora={"enabled": True, "init": "gaussian"}, training={"max_steps": 1, "batch_size": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert read_manifest(tmp_path / "run" / "model").base["config"] == str(tiny_dir)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "a red circle", "--steps", "2", "--width", "32",
                 "--height", "32", "--out", str(tmp_path / "drawn"), "--no-progress"]) == 0
    assert len(list((tmp_path / "drawn").glob("*.png"))) == 1


def test_sd15_layout_four_levels_two_layers():
    """SD 1.5's UNet and VAE shapes (on the meta device: no memory) get SD 1.5's names and
    counts, and diffusers' own LDM reader maps every one of them back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the defaults are SD 1.x
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    ldm_unet, ldm_vae = unet_to_ldm(unet_sd), vae_to_ldm(vae_sd)
    assert (len(ldm_unet), len(ldm_vae)) == (686, 248)  # the counts in v1-5-pruned-emaonly.safetensors
    assert {k for k in ldm_unet if k.endswith((".op.weight", ".conv.weight"))} == {
        f"model.diffusion_model.{k}.weight"
        for k in ("input_blocks.3.0.op", "input_blocks.6.0.op", "input_blocks.9.0.op",
                  "output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv")
    }
    assert infer_diffusers_model_type(ldm_unet) == "v1"
    back = convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))
    assert back.keys() == unet_sd.keys() and all(back[k].shape == unet_sd[k].shape for k in back)
    back = convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))
    assert back.keys() == vae_sd.keys() and all(back[k].shape == vae_sd[k].shape for k in back)


def test_four_level_two_layer_weights_round_trip():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8,
    )
    back = convert_ldm_unet_checkpoint(unet_to_ldm(unet.state_dict()), dict(unet.config))
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())


def test_metadata_and_fp16(tiny_pipe, tiny_dir, single_file, tmp_path):
    with safe_open(single_file, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "modelspec.title": "tiny"}
    pipe = tiny_pipe
    half = save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "half.safetensors", dtype=torch.float16)
    ratio = half.stat().st_size / single_file.stat().st_size
    assert 0.49 < ratio < 0.52, ratio
    models = load_single_file_components(half, tiny_dir, dtype=torch.float16)
    for name in PARTS:
        original = getattr(tiny_pipe, name).state_dict()
        for key, tensor in models[name].state_dict().items():
            assert tensor.dtype == torch.float16 and torch.equal(tensor, original[key].half()), key


def test_write_is_atomic_and_refuses_bad_input(tiny_pipe, tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(SingleFileError, match="metadata values must be strings"):
        save_single_file(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder, target, metadata={"steps": 10})
    assert target.read_bytes() == b"old"
    save_single_file(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder, target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
    assert len(to_ldm_state_dict(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)) == 368
    with pytest.raises(SingleFileError, match=r"model\.ckpt: .* must end in \.safetensors"):
        save_single_file(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder, tmp_path / "model.ckpt")


def test_unknown_layout_is_refused_not_dropped():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=2, class_embed_type="timestep",
    )
    with pytest.raises(SingleFileError, match=r"unet: 4 weights have no Stable Diffusion \(LDM\) name"):
        unet_to_ldm(unet.state_dict())


def test_a_v_prediction_file_carries_its_ldm_config_and_marker_and_loads_back_as_v(tiny_pipe, tmp_path, monkeypatch):
    """The keys cannot say v-prediction: the .yaml beside the file (A1111 reads it first) and `v_pred` do. diffusers
    builds the model from that yaml (`original_config`) as the pipeline it came from; difftrain reads it back as v."""
    import huggingface_hub.constants
    import yaml
    from diffusers import StableDiffusionPipeline
    from test_sd_loading import hub_cache

    from difftrain.models.sd import load_sd

    noise = {**tiny_pipe.scheduler.config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    path = save_single_file(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder, tmp_path / "v.safetensors",
                            noise=noise)
    with safe_open(path, framework="pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())  # Forge's and ComfyUI's markers
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    params = config["model"]["params"]
    assert params["parameterization"] == "v" and params["linear_end"] == noise["beta_end"]
    assert params["cond_stage_config"]["target"] == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    theirs = StableDiffusionPipeline.from_single_file(
        str(path), original_config=str(path.with_suffix(".yaml")), text_encoder=tiny_pipe.text_encoder,
        tokenizer=tiny_pipe.tokenizer, local_files_only=True, safety_checker=None)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                "cross_attention_dim", "in_channels"):
        assert theirs.unet.config[key] == tiny_pipe.unet.config[key], key
    assert theirs.vae.config.block_out_channels == tiny_pipe.vae.config.block_out_channels
    assert_same_weights(tiny_pipe.unet, theirs.unet)  # (diffusers takes the models from it, not the parameterization)
    # difftrain's own loader, with the configs diffusers guesses for an SD 1.x file from an HF cache.
    tiny_pipe.save_pretrained(tmp_path / "hub-source")
    hub_cache(tmp_path / "hub2", "stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path / "hub-source")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub2"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reloaded = load_sd(str(path), load={"unet"}).scheduler.config
    assert reloaded.prediction_type == "v_prediction" and reloaded.rescale_betas_zero_snr  # (from its ztsnr key)
    # Configs given (config=, as the offline message advises) do not silence the file's yaml and markers; on SD
    # 1.5's PNDM, which cannot rescale to zero SNR, DDIM samples it.
    from diffusers import DDIMScheduler, PNDMScheduler

    pndm = StableDiffusionPipeline.from_pretrained(tmp_path / "hub-source", safety_checker=None)
    pndm.scheduler = PNDMScheduler.from_config(pndm.scheduler.config)
    pndm.save_pretrained(tmp_path / "pndm-source")
    for source in ("hub-source", "pndm-source"):
        given = load_sd(str(path), load={"unet"}, config=str(tmp_path / source)).scheduler
        assert given.config.prediction_type == "v_prediction" and given.config.rescale_betas_zero_snr, source
        assert float(given.alphas_cumprod[-1]) < 1e-6, source  # the schedule really reaches zero SNR
    assert isinstance(given, DDIMScheduler)
    path.with_suffix(".yaml").unlink()  # an epsilon SD 1.x file has no yaml; its marker alone still says v
    assert load_sd(str(path), load={"unet"}).scheduler.config.prediction_type == "v_prediction"
    plain = save_single_file(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder, tmp_path / "eps.safetensors",
                             noise=dict(tiny_pipe.scheduler.config))
    assert not plain.with_suffix(".yaml").exists()
    assert load_sd(str(plain), load={"unet"}).scheduler.config.prediction_type == "epsilon"
