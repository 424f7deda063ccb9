"""load_sd: folders, overrides, random init from a config, single files, and the errors users meet."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from difftrain.models.sd import ModelLoadError, load_sd


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from difftrain.models.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_a"), seed=0)


@pytest.fixture(scope="session")
def tiny_b(tmp_path_factory):
    from difftrain.models.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_b"), seed=1)


@pytest.fixture(scope="session")
def tiny_file(tiny, tmp_path_factory):
    from difftrain.models.single_file import save_single_file

    parts = load_sd(str(tiny), load={"unet", "vae", "text_encoder"})
    path = tmp_path_factory.mktemp("sf") / "tiny.safetensors"
    return save_single_file(parts.unet, parts.vae, parts.text_encoder, path)


def weights(folder, name):
    filename = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(folder / name / filename)


def equal(model, state) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in state)


def test_pipeline_folder(tiny):
    sd = load_sd(str(tiny))
    for name in ("unet", "vae", "text_encoder"):
        assert equal(getattr(sd, name), weights(tiny, name)), name
    assert type(sd.text_encoder).__name__ == "CLIPTextModel"
    assert sd.tokenizer("a red circle").input_ids[0] == sd.tokenizer.bos_token_id
    assert type(sd.scheduler).__name__ == "DDIMScheduler" and sd.scheduler.config.beta_schedule == "scaled_linear"
    assert sd.source.startswith(f"unet: folder {tiny}/unet; vae: folder {tiny}/vae")


def test_overrides_from_another_model(tiny, tiny_b):
    from_pipeline = load_sd(str(tiny), unet=str(tiny_b), load={"unet", "vae"})
    from_component = load_sd(str(tiny), unet=str(tiny_b / "unet"), load={"unet", "vae"})
    for sd in (from_pipeline, from_component):
        assert equal(sd.unet, weights(tiny_b, "unet")) and not equal(sd.unet, weights(tiny, "unet"))
        assert equal(sd.vae, weights(tiny, "vae"))
        assert f"unet: folder {tiny_b}/unet" in sd.source and f"vae: folder {tiny}/vae" in sd.source


def test_unet_from_json_config_is_random(tiny, tmp_path):
    config = json.loads((tiny / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 32]  # a different size than the base's, same interface
    config["norm_num_groups"] = 8
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    sd = load_sd(str(tiny), unet=str(path), load={"unet", "text_encoder"})
    assert list(sd.unet.config.block_out_channels) == [16, 32] and sd.unet.config.cross_attention_dim == 32
    assert sd.unet.conv_in.weight.shape == (16, 4, 3, 3) and sd.unet.conv_in.weight.std() > 0
    assert f"unet: random init from {path}" in sd.source
    torch.manual_seed(1)
    other = load_sd(str(tiny), unet=str(path), load={"unet"})
    assert not torch.equal(other.unet.conv_in.weight, sd.unet.conv_in.weight)


def test_bad_unet_json(tiny, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    with pytest.raises(ModelLoadError, match=r"unet: cannot read .*broken\.json as JSON"):
        load_sd(str(tiny), unet=str(broken), load={"unet"})
    with pytest.raises(ModelLoadError, match=r"vae/config\.json is a AutoencoderKL config; a UNet2DConditionModel"):
        load_sd(str(tiny), unet=str(tiny / "vae" / "config.json"), load={"unet"})
    # A folder of another class: diffusers loaded what fit and a traceback came at the first step
    from difftrain.models.tiny_sd import write_tiny_controlnet

    controlnet = write_tiny_controlnet(tiny, tmp_path / "cn")
    with pytest.raises(ModelLoadError, match=r"unet: .*cn holds a ControlNetModel, not a UNet2DConditionModel"):
        load_sd(str(tiny), unet=str(controlnet), load={"unet"})
    with pytest.raises(ModelLoadError, match=r"vae: .*unet holds a UNet2DConditionModel, not a AutoencoderKL"):
        load_sd(str(tiny), vae=str(tiny / "unet"), load={"vae"})
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"block_out_channels": [32, 64], "cross_atention_dim": 32}))
    with pytest.raises(ModelLoadError, match=r"does not know: \['cross_atention_dim'\]"):
        load_sd(str(tiny), unet=str(typo), load={"unet"})


def test_load_only_the_unet(tiny):
    sd = load_sd(str(tiny), load={"unet"})
    assert sd.unet is not None and (sd.vae, sd.text_encoder, sd.tokenizer) == (None, None, None)
    assert "vae: not loaded; text_encoder: not loaded; tokenizer: not loaded" in sd.source
    half = load_sd(str(tiny), load={"unet"}, dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_parts_that_do_not_fit(tiny, tmp_path):
    config = json.loads((tiny / "unet" / "config.json").read_text())
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({**config, "cross_attention_dim": 48}))
    with pytest.raises(ModelLoadError) as error:
        load_sd(str(tiny), unet=str(path), load={"unet", "text_encoder"})
    message = str(error.value)
    assert "unet cross_attention_dim 48" in message and "text_encoder hidden size 32" in message
    assert str(path) in message and f"{tiny}/text_encoder" in message
    path.write_text(json.dumps({**config, "in_channels": 3, "out_channels": 3}))
    with pytest.raises(ModelLoadError, match=r"unet in_channels 3 / out_channels 3 .* vae latent_channels 4"):
        load_sd(str(tiny), unet=str(path), load={"unet", "vae"})
    # sd-v1-5-inpainting's shape: refused by name, not left to fail in a convolution at the first step or draw.
    path.write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(ModelLoadError, match=r"9 input channels, an inpainting model .*stable-diffusion-v1-5 rather"):
        load_sd(str(tiny), unet=str(path), load={"unet", "vae"})


def test_an_sd2_single_files_prediction_type_is_found_as_a1111_finds_it(tmp_path, monkeypatch, caplog):
    """SD 2.x at 512 px (epsilon) and at 768 px (v) have the same keys. A .yaml beside the file says which, else
    the UNet is asked at t = 999. The stand-in UNet's output is set through its last layer: a constant c, so
    A1111's test reads c - 0.5 (v-prediction below -1)."""
    import logging

    import huggingface_hub.constants

    from difftrain.models.single_file import save_single_file
    from difftrain.models.tiny_sd import tiny_sd_components

    parts = tiny_sd_components(text_hidden=1024, text_layers=1, layers_per_block=2)  # SD 2's key says 1024 wide
    folder = tmp_path / "sd2"
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    # diffusers guesses stabilityai/stable-diffusion-2-1 for any SD 2 file: its configs, from an HF cache.
    hub_cache(tmp_path / "hub", "stabilityai/stable-diffusion-2-1", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    caplog.set_level(logging.INFO, logger="difftrain.models.sd")
    unet = parts["unet"]
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        for constant, expected in ((0.5, "epsilon"), (-1.0, "v_prediction")):
            unet.conv_out.bias.fill_(constant)
            path = save_single_file(unet, parts["vae"], parts["text_encoder"], tmp_path / f"sd2-{constant}.safetensors")
            loaded = load_sd(str(path), load={"unet"})
            assert loaded.scheduler.config.prediction_type == expected
            assert loaded.unet.config.sample_size == (64 if expected == "epsilon" else unet.config.sample_size)
            assert f"its UNet's answer at t = 999 (A1111's test) says {expected}" in caplog.text
    # A .yaml beside the file is read first, as A1111 reads it (a 768 px file ships with v2-inference-v.yaml).
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n    timesteps: 1000\n')
    unet.conv_out.bias.data.fill_(0.5)  # the UNet would say epsilon
    save_single_file(unet, parts["vae"], parts["text_encoder"], path)
    assert load_sd(str(path), load={"unet"}).scheduler.config.prediction_type == "v_prediction"
    assert "sd2--1.0.yaml beside it says v_prediction" in caplog.text
    path.with_suffix(".yaml").unlink()
    from safetensors.torch import load_file, save_file

    save_file({**load_file(path), "v_pred": torch.tensor([])}, path)  # Forge's and ComfyUI's marker
    assert load_sd(str(path), load={"unet"}).scheduler.config.prediction_type == "v_prediction"
    # Given configs describe the architecture; the file's own marker (or yaml) still says v, and only without
    # one do the configs' scheduler speak: the UNet is not asked (here it would say v).
    assert load_sd(str(path), load={"unet"}, config=str(folder)).scheduler.config.prediction_type == "v_prediction"
    unet.conv_out.bias.data.fill_(-1.0)
    save_single_file(unet, parts["vae"], parts["text_encoder"], path)
    assert load_sd(str(path), load={"unet"}, config=str(folder)).scheduler.config.prediction_type == "epsilon"


def test_sdxl_and_inpainting_models_are_refused_by_name_before_any_weight_loads(tiny, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "xl"
    shutil.copytree(tiny, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLPipeline",
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # nothing may be read
    with pytest.raises(ModelLoadError, match=r"a StableDiffusionXLPipeline; difftrain trains and draws Stable"):
        load_sd(str(folder))
    # Single files, by the keys diffusers tells model types apart with (their shapes only are read first).
    xl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}, xl)
    with pytest.raises(ModelLoadError, match=r"sdxl.safetensors: its keys are those of a 'xl_base' checkpoint"):
        load_sd(str(xl))
    with pytest.raises(ModelLoadError, match=r"sdxl.safetensors: its keys are those of a 'xl_base' checkpoint"):
        load_sd(str(xl), config=str(tiny))  # configs given: the file's kind is still checked
    inpainting = tmp_path / "inpainting.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, inpainting)
    with pytest.raises(ModelLoadError, match=r"inpainting.safetensors: an inpainting model"):
        load_sd(str(inpainting))


def test_missing_and_wrong_paths(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match=r"base: /no/such/model does not exist"):
        load_sd("/no/such/model")
    with pytest.raises(ModelLoadError, match=r"vae: .*nope does not exist"):
        load_sd(str(tiny), vae=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"is not a diffusers pipeline folder \(no model_index\.json"):
        load_sd(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"vae: .* is neither a vae folder \(config\.json\) nor a pipeline with"):
        load_sd(str(tiny), vae=str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"base: no base model, so \['vae', 'text_encoder', 'tokenizer'\] must"):
        load_sd(None, unet=str(tiny))


def test_no_base_when_every_part_is_given(tiny):
    sd = load_sd(None, unet=str(tiny), vae=str(tiny), text_encoder=str(tiny), tokenizer=str(tiny / "tokenizer"))
    assert equal(sd.unet, weights(tiny, "unet")) and sd.tokenizer is not None
    assert type(sd.scheduler).__name__ == "DDPMScheduler" and sd.scheduler.config.beta_end == 0.012


def test_hub_id_offline_fails_fast_and_clearly():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_sd("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5' is not a local path" in message
    assert "not in the local HF cache" in message and "network access" in message
    assert "local diffusers folder" in message


def test_an_unreachable_hub_is_found_out_at_once_not_after_its_retries(monkeypatch):
    """Online by setting, but the Hub's host refuses (here a loopback port nobody listens on): huggingface_hub
    retried for ~25 s before our message; one probe now says it at once."""
    import socket

    from huggingface_hub import constants

    from difftrain.models import sd

    with socket.socket() as placeholder:  # a port just freed: nothing listens there
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for name in sd.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="the Hugging Face Hub could not be reached"):
        load_sd("someone/not-cached")
    assert time.monotonic() - start < 5
    assert sd._unreachable(f"http://127.0.0.1:{port}") is True
    # The metric and captioning models' hub ids too (CLIP): refused at once, before any work.
    from difftrain.evaluate.clip_score import check_available
    from difftrain.evaluate.weights import EvalError

    monkeypatch.delenv("DIFFTRAIN_OFFLINE", raising=False)
    with pytest.raises(EvalError, match="not in the Hugging Face cache, and this machine is offline"):
        check_available("someone/a-clip")


def test_a_mistyped_local_path_is_named_as_such_not_looked_up_on_the_hub(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from difftrain.models import sd

    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_sd("runs/my-rnu")  # a hub id's shape, but runs/ is here
    assert time.monotonic() - start < 5
    assert str(error.value) == ("base: runs/my-rnu does not exist (check the path; runs/ holds my-run; runs/ is a "
                                "local folder, so this is read as a local path, not a hub id)")
    with pytest.raises(ModelLoadError, match=r"base: \./runs/my-rnu does not exist \(check the path; runs/ holds "
                                             r"my-run\)$"):
        load_sd("./runs/my-rnu")
    # Online, a hub id that cannot be fetched blames the connection, not HF_HUB_OFFLINE.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "the Hugging Face Hub could not be reached" in str(sd._offline_error("base", "a/b"))


def test_single_file_base_and_override(tiny, tiny_b, tiny_file):
    sd = load_sd(str(tiny_file), config=str(tiny))
    for name in ("unet", "vae", "text_encoder"):
        assert equal(getattr(sd, name), weights(tiny, name)), name
    assert sd.tokenizer is not None and type(sd.scheduler).__name__ == "DDIMScheduler"
    assert f"unet: single file {tiny_file} (config {tiny}/unet)" in sd.source
    # A1111-style: a base folder with the VAE taken from a single file.
    mixed = load_sd(str(tiny_b), vae=str(tiny_file), load={"unet", "vae"})
    assert equal(mixed.vae, weights(tiny, "vae")) and equal(mixed.unet, weights(tiny_b, "unet"))


def test_single_file_without_config_offline(tiny_file):
    with pytest.raises(ModelLoadError) as error:
        load_sd(str(tiny_file))
    message = str(error.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "not in the local HF cache" in message
    assert "--config <a local diffusers folder" in message


def test_pickles_need_consent(tiny, tiny_file, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_file)}, ckpt)
    with pytest.raises(ModelLoadError, match=r"tiny\.ckpt: \.ckpt files are Python pickles.*allow_pickle=True"):
        load_sd(str(ckpt), config=str(tiny))
    sd = load_sd(str(ckpt), config=str(tiny), allow_pickle=True, load={"unet", "vae"})
    assert equal(sd.unet, weights(tiny, "unet")) and equal(sd.vae, weights(tiny, "vae"))


def test_single_file_missing_a_part(tiny, tiny_file, tmp_path):
    from safetensors.torch import save_file

    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(tiny_file).items() if k.startswith("model.diffusion_model.")}, unet_only)
    assert equal(load_sd(str(unet_only), config=str(tiny), load={"unet"}).unet, weights(tiny, "unet"))
    with pytest.raises(ModelLoadError, match=r"vae: .*unet_only\.safetensors holds no vae weights"):
        load_sd(str(unet_only), config=str(tiny), load={"unet", "vae"})


def test_single_file_and_config_of_different_models(tiny, tiny_file, tmp_path):
    from safetensors.torch import save_file

    cut = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in load_file(tiny_file).items() if not k.endswith("final_layer_norm.weight")}, cut)
    with pytest.raises(ModelLoadError, match=r"text_encoder: .*cut\.safetensors lacks weights .*final_layer_norm"):
        load_sd(str(cut), config=str(tiny), load={"unet", "text_encoder"})
    other = tmp_path / "other"  # the tiny configs, but a UNet that expects 48-wide text embeddings
    shutil.copytree(tiny, other, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
    with pytest.raises(ModelLoadError, match=r"unet: .*tiny\.safetensors is another architecture than .*other/unet: "
                       r"\S+attn2\.to_k\.weight is torch\.Size\(\[32, 32\]\) in the file but the config expects"):
        load_sd(str(tiny_file), config=str(other), load={"unet"})


def hub_cache(root, repo: str, folder) -> None:
    """`folder` as huggingface_hub's cache holds a downloaded repo: models--owner--name/snapshots/<commit>/, with
    refs/main naming the commit (what an earlier `huggingface-cli download` leaves on a machine now offline)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


def test_hub_ids_load_offline_from_the_hf_cache_and_are_checked_by_kind(tiny, tiny_b, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    hub_cache(cache, "someone/tiny-sd", tiny)
    xl = tmp_path / "xl"
    shutil.copytree(tiny, xl)
    index = json.loads((xl / "model_index.json").read_text()) | {
        "_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (xl / "model_index.json").write_text(json.dumps(index))
    hub_cache(cache, "someone/tiny-xl", xl)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    from_hub, from_folder = load_sd("someone/tiny-sd"), load_sd(str(tiny))
    assert equal(from_hub.unet, from_folder.unet.state_dict()) and equal(from_hub.vae, from_folder.vae.state_dict())
    hub_cache(cache, "someone/other-sd", tiny_b)
    assert equal(load_sd(str(tiny), vae="someone/other-sd").vae, weights(tiny_b, "vae"))  # a part by hub id
    # A local folder named like the owner does not hide a cached hub id (a missing local path would be named).
    (tmp_path / "work" / "someone").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert equal(load_sd("someone/tiny-sd").unet, from_folder.unet.state_dict())
    with pytest.raises(ModelLoadError, match="someone/ is a local folder, so this is read as a local path"):
        load_sd("someone/not-cached")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"someone/tiny-xl: a StableDiffusionXLPipeline; difftrain trains"):
        load_sd("someone/tiny-xl")
    # What users run: `difftrain generate owner/name` draws what the same folder on disk draws.
    import numpy as np
    from PIL import Image

    from difftrain.cli import main

    drawn = {}
    for name, model in (("hub", "someone/tiny-sd"), ("folder", str(tiny))):
        assert main(["generate", model, "--prompt", "a red circle", "--steps", "2", "--width", "64", "--height", "64",
                     "--seed", "3", "--out", str(tmp_path / name), "--no-progress"]) == 0
        drawn[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))))
    assert np.array_equal(drawn["hub"], drawn["folder"])
