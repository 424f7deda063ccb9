"""The LoRA files we write load through diffusers' own loaders and reproduce the trained model."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difftrain.models.lora_files import (
    LoraFileError,
    check_lora_fits,
    convert_lora,
    load_lora_state,
    save_lora,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FACTS = {"base_model": "tiny-sd", "steps": 100, "resolution": 32, "num_images": 12}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from difftrain.models.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_lora"), seed=0)


def load_pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True)


def image(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    out = pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np", height=32, width=32,
               **kwargs)
    return out.images[0]


def prompt_embeds(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt("a red circle", "cpu", 1, False)[0]


def add_lora(pipe, seed=1, unet_config=None, text_config=None):
    """Seeded random lora_A AND lora_B (peft's default init makes B zero: no effect to test)."""
    torch.manual_seed(seed)
    unet = {"r": 4, "lora_alpha": 2, "target_modules": UNET_TARGETS, **(unet_config or {})}
    text = {"r": 4, "lora_alpha": 8, "target_modules": TEXT_TARGETS, **(text_config or {})}
    pipe.unet.add_adapter(peft.LoraConfig(init_lora_weights=False, **unet))
    pipe.text_encoder.add_adapter(peft.LoraConfig(init_lora_weights=False, **text))
    return pipe


@pytest.fixture(scope="session")
def base(tiny_dir):
    pipe = load_pipe(tiny_dir)
    return {"image": image(pipe), "embeds": prompt_embeds(pipe)}


@pytest.fixture(scope="session")
def trained(tiny_dir, tmp_path_factory):
    """A 'trained' LoRA (unet alpha 2 rank 4: scale 0.5; text encoder alpha 8: scale 2), saved."""
    pipe = add_lora(load_pipe(tiny_dir))
    out = tmp_path_factory.mktemp("lora")
    diffusers_file, kohya_file = save_lora(out, pipe.unet, pipe.text_encoder, metadata=FACTS, kohya_name="tiny_style")
    files = {"dir": out, "diffusers": diffusers_file, "kohya": kohya_file}
    return {"pipe": pipe, **files, "image": image(pipe), "embeds": prompt_embeds(pipe)}


def test_saving_asks_nothing_of_the_hub(tiny_dir, tmp_path, monkeypatch):
    # peft's default save_embedding_layers="auto" looked the base model up on the Hub at every save of
    # a text encoder's adapter: transformers names the adapter's base after the encoder's name_or_path,
    # which is the hub id (or a pipeline folder without a config.json) when training loads it by subfolder.
    import peft.utils.save_and_load as peft_save

    def no_network(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_network)
    pipe = load_pipe(tiny_dir)
    pipe.text_encoder.name_or_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # as a base given by hub id
    add_lora(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor peft's "Could not find a config file" when the lookup fails offline
        written = save_lora(tmp_path, pipe.unet, pipe.text_encoder)
    assert all(path.stat().st_size > 0 for path in written)


def test_files_are_named_as_the_tools_expect(trained):
    assert trained["diffusers"] == trained["dir"] / "pytorch_lora_weights.safetensors"
    assert trained["kohya"] == trained["dir"] / "tiny_style.safetensors"
    names = sorted(p.name for p in trained["dir"].iterdir())
    assert names == ["pytorch_lora_weights.safetensors", "tiny_style.safetensors"]  # no temp files left


def test_diffusers_file_matches_save_lora_weights(trained, tmp_path):
    """Same tensors and adapter config as diffusers' own save; our text-encoder keys keep CLIP's
    text_model. (which transformers 5 dropped) so transformers 4 installs load them too."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = trained["pipe"]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    theirs = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    ours = {k.replace(".text_model.", "."): v for k, v in load_file(trained["diffusers"]).items()}
    # (4 transformer blocks x 2 attentions + 2 CLIP layers) x q,k,v,out x down,up
    assert len(ours) == len(theirs) == (4 * 2 + 2) * 4 * 2
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in ours
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in ours

    with safe_open(str(trained["diffusers"]), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    # Only the fields diffusers' get_peft_kwargs fills (portable to older peft), same meaning.
    assert sorted({k.split(".", 1)[1] for k in config}) == [
        "alpha_pattern", "lora_alpha", "lora_bias", "r", "rank_pattern", "target_modules", "use_dora"
    ]
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 2)
    assert (config["text_encoder.r"], config["text_encoder.lora_alpha"]) == (4, 8)
    assert config["unet.rank_pattern"] == config["unet.alpha_pattern"] == {}
    targets = config["unet.target_modules"]
    assert len(targets) == 32 and all(t.endswith(tuple(UNET_TARGETS)) for t in targets)


def test_diffusers_file_reproduces_the_trained_model(tiny_dir, trained, base):
    pipe = load_pipe(tiny_dir)
    pipe.load_lora_weights(trained["dir"])  # a folder: diffusers picks pytorch_lora_weights.safetensors
    got = image(pipe)
    assert np.abs(got - base["image"]).max() > 0.02  # the LoRA does something
    np.testing.assert_allclose(got, trained["image"], atol=1e-6)
    torch.testing.assert_close(prompt_embeds(pipe), trained["embeds"])  # the text encoder's LoRA too
    assert (prompt_embeds(pipe) - base["embeds"]).abs().max() > 0.1

    # Scale 0 (unet through cross_attention_kwargs, text encoder through encode_prompt's lora_scale).
    np.testing.assert_allclose(image(pipe, cross_attention_kwargs={"scale": 0.0}), base["image"], atol=1e-6)


def test_kohya_file_names_and_alphas(trained):
    tensors = load_file(trained["kohya"])
    assert len(tensors) == 3 * (32 + 8)
    unet_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    text_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{unet_q}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{unet_q}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{unet_q}.alpha"].ndim == 0 and tensors[f"{unet_q}.alpha"].item() == 2.0
    assert tensors[f"{text_q}.alpha"].item() == 8.0
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    attn1 = trained["pipe"].unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    peft_down = attn1.to_q.lora_A["default"].weight
    assert torch.equal(tensors[f"{unet_q}.lora_down.weight"], peft_down.detach())


def test_kohya_file_through_diffusers_kohya_path(tiny_dir, trained):
    pipe = load_pipe(tiny_dir)
    pipe.load_lora_weights(str(trained["kohya"]))  # a single file with lora_unet_/lora_te_ keys
    np.testing.assert_allclose(image(pipe), trained["image"], atol=1e-6)
    torch.testing.assert_close(prompt_embeds(pipe), trained["embeds"])


def test_metadata_in_both_files(trained, tmp_path):
    metas = {}
    for kind in ("diffusers", "kohya"):
        with safe_open(str(trained[kind]), "pt") as f:
            metas[kind] = f.metadata()
        assert metas[kind]["base_model"] == "tiny-sd" and metas[kind]["rank"] == "4"
    meta = metas["kohya"]
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_sd_model_name"] == "tiny-sd" and meta["ss_resolution"] == "32,32"
    assert meta["ss_max_train_steps"] == "100" and meta["ss_num_train_images"] == "12"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_output_name"] == "tiny_style"
    assert "lora_adapter_metadata" not in meta  # diffusers refuses a kohya file that also carries its adapter config
    # kohya's fields only where kohya's keys are: a diffusers-keyed file holding them is listed as a kohya LoRA by
    # Civitai and LoRA browsers, and A1111 and ComfyUI cannot load its keys.
    assert not any(key.startswith(("ss_", "sshs_", "modelspec.")) for key in metas["diffusers"])
    # Converted back to kohya's keys, the file says kohya's facts again, made from ours.
    with safe_open(str(convert_lora(trained["diffusers"], tmp_path / "back", to="kohya")), "pt") as f:
        back = f.metadata()
    assert back["ss_network_dim"] == "4" and back["ss_output_name"] == "tiny_style" and len(back["sshs_model_hash"]) == 64
    # A kohya file converted to kohya's keys again holds the hash of the tensors as written, not its source's.
    from safetensors.torch import load_file, save_file

    halved = tmp_path / "halved.safetensors"
    save_file({k: v.half() for k, v in load_file(trained["kohya"]).items()}, halved, metadata=meta)
    with safe_open(str(convert_lora(halved, tmp_path / "again", to="kohya")), "pt") as f:
        again = f.metadata()
    payload = (tmp_path / "again.safetensors").read_bytes()
    start = 8 + int.from_bytes(payload[:8], "little")
    assert again["sshs_model_hash"] == hashlib.sha256(payload[start:]).hexdigest() != meta["sshs_model_hash"]


def test_load_lora_state_detects_formats(trained, tiny_dir):
    tensors, meta, fmt = load_lora_state(trained["kohya"])
    assert fmt == "kohya" and len(tensors) == 120 and meta["ss_network_dim"] == "4"
    assert load_lora_state(trained["dir"])[2] == "diffusers"
    with pytest.raises(LoraFileError, match=r"not a LoRA .*key format"):
        load_lora_state(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LoraFileError, match="no such LoRA file"):
        load_lora_state(trained["dir"] / "missing.safetensors")


def test_convert_round_trips(trained, tmp_path):
    back_and_forth = convert_lora(trained["kohya"], tmp_path / "d", to="diffusers")
    assert back_and_forth == tmp_path / "d" / "pytorch_lora_weights.safetensors"
    assert load_lora_state(back_and_forth)[2] == "diffusers"
    again = convert_lora(back_and_forth, tmp_path / "again.safetensors", to="kohya")
    original, original_meta, _ = load_lora_state(trained["kohya"])
    tensors, meta, _ = load_lora_state(again)
    assert tensors.keys() == original.keys()
    assert all(torch.equal(tensors[k], original[k]) and tensors[k].dtype == original[k].dtype for k in tensors)
    dated = "modelspec.date"  # when the kohya fields were written: now, for the converted file
    assert {k: v for k, v in meta.items() if k != dated} == {k: v for k, v in original_meta.items() if k != dated}

    # And our diffusers file converts to exactly our kohya file.
    direct, _, _ = load_lora_state(convert_lora(trained["diffusers"], tmp_path / "direct.safetensors", to="kohya"))
    assert direct.keys() == original.keys() and all(torch.equal(direct[k], original[k]) for k in direct)
    with pytest.raises(LoraFileError, match="choose 'kohya' or 'diffusers'"):
        convert_lora(trained["kohya"], tmp_path / "x.safetensors", to="a1111")


def test_patterns_and_rslora_survive_every_format(tiny_dir, tmp_path):
    """Per-module rank and alpha (rank_pattern / alpha_pattern) and rsLoRA's alpha/sqrt(r)."""
    pipe = add_lora(
        load_pipe(tiny_dir),
        seed=2,
        unet_config={
            "target_modules": UNET_TARGETS + ["proj_in"],
            "rank_pattern": {"to_q": 2},
            "alpha_pattern": {"to_k": 8},
        },
        text_config={"r": 2, "use_rslora": True, "target_modules": TEXT_TARGETS + ["fc1"]},
    )
    want = image(pipe)
    diffusers_file, kohya_file = save_lora(tmp_path, pipe.unet, pipe.text_encoder)
    kohya = load_file(kohya_file)
    block = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1"
    assert kohya[f"{block}_to_q.lora_down.weight"].shape[0] == 2 and kohya[f"{block}_to_q.alpha"].item() == 2.0
    assert kohya[f"{block}_to_k.alpha"].item() == 8.0  # scale 8/4 = 2, as peft's alpha_pattern gave
    assert kohya["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"].item() == pytest.approx(8 * 2**0.5)

    loaded = load_pipe(tiny_dir)
    loaded.load_lora_weights(str(diffusers_file))
    np.testing.assert_allclose(image(loaded), want, atol=1e-6)
    # diffusers' own kohya path keeps one alpha per component (alpha_pattern is lost there);
    # converting the kohya file to the diffusers format keeps every module's.
    converted = load_pipe(tiny_dir)
    converted.load_lora_weights(str(convert_lora(kohya_file, tmp_path / "converted", to="diffusers")))
    np.testing.assert_allclose(image(converted), want, atol=1e-6)
    # What `difftrain generate --lora` and serve load through: the kohya file at every module's own alpha.
    from difftrain.generate.loader import apply_adapters

    ours = load_pipe(tiny_dir)
    apply_adapters(ours, [(str(kohya_file), 1.0)], [])
    np.testing.assert_allclose(image(ours), want, atol=1e-6)


def test_peft_file_from_diffusers_save_lora_adapter(tiny_dir, trained, tmp_path):
    trained["pipe"].unet.save_lora_adapter(tmp_path)  # peft keys, no "unet." prefix
    tensors, _, fmt = load_lora_state(tmp_path)
    assert fmt == "peft" and "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    kohya = load_file(convert_lora(tmp_path, tmp_path / "k.safetensors", to="kohya"))
    ours = {k: v for k, v in load_file(trained["kohya"]).items() if k.startswith("lora_unet_")}
    assert kohya.keys() == ours.keys() and all(torch.equal(kohya[k], ours[k]) for k in ours)
    # generate and serve load it too (diffusers alone looks for "unet."-prefixed keys and loads nothing).
    from difftrain.generate.loader import apply_adapters

    pipe = load_pipe(tiny_dir)
    assert apply_adapters(pipe, [(str(tmp_path), 1.0)], []) == ["lora0"]
    assert "lora0" in pipe.get_list_adapters()["unet"]
    want = image(pipe)
    assert not np.allclose(want, image(load_pipe(tiny_dir)))  # the adapter acts: the comparisons below mean something
    # The same adapter in older spellings: a PeftModel's ("base_model.model." first) and diffusers' attention-
    # processor files from before peft ("attn1.processor.to_q_lora.down.weight").
    import re

    peft_keys = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    spellings = {
        "peftmodel": {f"base_model.model.{k}": v for k, v in peft_keys.items()},
        "attn-procs": {re.sub(r"\.(to_[qkv]|to_out)(\.0)?\.lora_([AB])\.weight$",
                              lambda m: f".processor.{m[1]}_lora.{'down' if m[3] == 'A' else 'up'}.weight", k): v
                       for k, v in peft_keys.items()},
    }
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in (
        spellings["attn-procs"])
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        config = f.metadata()["lora_adapter_metadata"]
    (tmp_path / "peftmodel").mkdir()
    save_file(spellings["peftmodel"], tmp_path / "peftmodel" / "adapter_model.safetensors")
    (tmp_path / "peftmodel" / "adapter_config.json").write_text(config)  # its alpha, as save_pretrained keeps it
    save_file(spellings["attn-procs"], tmp_path / "attn-procs.safetensors", metadata={"lora_adapter_metadata": config})
    for path in (tmp_path / "peftmodel" / "adapter_model.safetensors", tmp_path / "attn-procs.safetensors"):
        pipe = load_pipe(tiny_dir)
        apply_adapters(pipe, [(str(path), 1.0)], [])
        np.testing.assert_allclose(image(pipe), want, atol=1e-6, err_msg=path.name)


def test_a_pre_peft_diffusers_file_with_text_encoder_layers_loads_as_diffusers_loads_it(tiny_dir, trained, tmp_path):
    """diffusers' save_attn_procs-era files (0.17) spell the UNet's layers "attn1.processor.to_q_lora.down.weight"
    and the text encoder's "self_attn.to_q_lora.down.weight"; diffusers still reads both (DIFFUSERS_OLD_TO_PEFT)."""
    import re

    from difftrain.generate.loader import apply_adapters

    def pre_peft(key: str) -> str:  # from our diffusers file's spelling (".lora.down", ".lora_linear_layer.down")
        key = re.sub(r"\.(to_[qkv]|to_out)(\.0)?\.lora\.(down|up)\.weight$", r".processor.\1_lora.\3.weight", key)
        return re.sub(r"\.self_attn\.(q|k|v|out)_proj\.lora_linear_layer\.(down|up)\.weight$",
                      r".self_attn.to_\1_lora.\2.weight", key)

    modern = load_file(trained["diffusers"])  # (these files had no alphas: both are written without the header)
    old = {pre_peft(key): value for key, value in modern.items()}
    assert any(".self_attn.to_out_lora.up.weight" in key for key in old) and len(old) == len(modern)
    assert any(".attn2.processor.to_out_lora.down.weight" in key for key in old)
    save_file(modern, tmp_path / "modern.safetensors")
    save_file(old, tmp_path / "old.safetensors")
    images = {}
    for name in ("modern", "old"):
        pipe = load_pipe(tiny_dir)
        apply_adapters(pipe, [(str(tmp_path / f"{name}.safetensors"), 1.0)], [])
        images[name] = image(pipe)
    theirs = load_pipe(tiny_dir)
    theirs.load_lora_weights(str(tmp_path / "old.safetensors"))
    assert np.array_equal(images["old"], images["modern"])
    np.testing.assert_allclose(images["old"], image(theirs), atol=1e-6)
    assert not np.allclose(images["old"], image(load_pipe(tiny_dir)))  # the text encoder's layers act too


def test_embeddings_bundled_in_a_kohya_lora_load_with_it_as_a1111_loads_them(tiny_dir, trained, tmp_path):
    """sd-scripts' pivotal tuning writes "bundle_emb.<token>.string_to_param.*" beside the LoRA's layers: the
    LoRA loads with its embeddings, as the LoRA and an embedding file of the same vectors load."""
    from difftrain.generate.loader import apply_adapters
    from difftrain.models.embeddings import EmbeddingFileError, save_embedding

    width = load_pipe(tiny_dir).text_encoder.config.hidden_size
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    tensors = load_file(trained["kohya"])
    with safe_open(str(trained["kohya"]), "pt") as f:
        metadata = f.metadata()
    save_file({**tensors, "bundle_emb.shapetok.string_to_param.*": vectors}, tmp_path / "bundle.safetensors",
              metadata=metadata)
    bundled = load_pipe(tiny_dir)
    assert apply_adapters(bundled, [(str(tmp_path / "bundle.safetensors"), 1.0)], []) == ["lora0"]
    apart = load_pipe(tiny_dir)
    _, embedding_file = save_embedding(tmp_path / "embedding", "shapetok", vectors)  # A1111's: shapetok.safetensors
    apply_adapters(apart, [(str(trained["kohya"]), 1.0)], [str(embedding_file)])

    def drawn(pipe, prompt: str) -> np.ndarray:
        generator = torch.Generator().manual_seed(7)
        return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np", height=32,
                    width=32).images[0]

    assert np.array_equal(drawn(bundled, "a shapetok circle"), drawn(apart, "a shapetok circle"))
    assert not np.allclose(drawn(bundled, "a shapetok circle"), drawn(bundled, "a circle"))
    # A diffusers LoRA file has no place for them: converting is refused, naming them; kohya keeps them.
    with pytest.raises(LoraFileError, match=r"bundles the embeddings shapetok \(bundle_emb\.\*\), which a diffusers"):
        convert_lora(tmp_path / "bundle.safetensors", tmp_path / "as-diffusers", "diffusers")
    kept = load_file(convert_lora(tmp_path / "bundle.safetensors", tmp_path / "again.safetensors", "kohya"))
    assert torch.equal(kept["bundle_emb.shapetok.string_to_param.*"], vectors)
    # Its token may not be a word the model has, nor given twice.
    with pytest.raises(EmbeddingFileError, match=r"shapetok.safetensors: its token 'shapetok' is given "
                       r"twice \(also by .*bundle.safetensors, its bundled embedding\)"):
        apply_adapters(load_pipe(tiny_dir), [(str(tmp_path / "bundle.safetensors"), 1.0)], [str(embedding_file)])


def test_merge_equals_lora_at_the_same_scale(tiny_dir, trained, base, tmp_path):
    from difftrain.generate.merge import merge_loras

    merged_dir = merge_loras(str(tiny_dir), [(trained["kohya"], 0.5)], tmp_path / "merged", progress=False)
    merged = load_pipe(merged_dir)
    assert not any("lora" in k for k in merged.unet.state_dict())
    with_lora = load_pipe(tiny_dir)
    with_lora.load_lora_weights(trained["dir"])
    at_half = image(with_lora, cross_attention_kwargs={"scale": 0.5})
    np.testing.assert_allclose(image(merged), at_half, atol=1e-4)
    assert np.abs(at_half - base["image"]).max() > 0.01 and np.abs(at_half - trained["image"]).max() > 0.01

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(LoraFileError, match="exists and is not empty"):
        merge_loras(str(tiny_dir), [(trained["kohya"], 1.0)], tmp_path / "busy", progress=False)


def test_check_lora_fits(tiny_dir, trained, tmp_path):
    from difftrain.models.tiny_sd import tiny_sd_components

    pipe = load_pipe(tiny_dir)
    check_lora_fits(pipe, trained["kohya"])  # fits: no error
    check_lora_fits({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, trained["diffusers"])

    # A LoRA trained on a narrower UNet.
    other = tiny_sd_components(seed=0, unet_channels=(16, 32))["unet"]
    torch.manual_seed(3)
    other.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False))
    _, wrong = save_lora(tmp_path / "other", unet=other)
    with pytest.raises(LoraFileError) as err:
        check_lora_fits(pipe, wrong)
    message = str(err.value)
    assert "32 of 32 LoRA modules do not fit" in message and "and 27 more" in message
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight: "
        "down [4, 16] up [16, 4] vs unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight [32, 32]"
    ) in message

    # A module the base model does not have.
    tensors = load_file(trained["kohya"])
    renamed = {k.replace("encoder_layers_1_", "encoder_layers_7_"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "extra.safetensors")
    missing = r"lora_te_text_model_encoder_layers_7_self_attn_\w+\.lora_down\.weight: "
    missing += r"no layer text_encoder\.encoder\.layers\.7\."
    with pytest.raises(LoraFileError, match=missing):
        check_lora_fits(pipe, tmp_path / "extra.safetensors")


def test_save_lora_refuses_what_it_cannot_write(tiny_dir, tmp_path):
    pipe = load_pipe(tiny_dir)
    with pytest.raises(LoraFileError, match="unet has no LoRA adapter 'default'"):
        save_lora(tmp_path, pipe.unet)
    with pytest.raises(LoraFileError, match="pass the unet and/or the text encoder"):
        save_lora(tmp_path)
    with pytest.raises(LoraFileError, match="kohya_name"):
        save_lora(tmp_path, pipe.unet, kohya_name="pytorch_lora_weights")
    assert list(tmp_path.iterdir()) == []


def test_a_partial_attention_lora_on_sd2s_encoder_is_warned_of(caplog):
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftrain.models.lora import warn_partial_open_clip_attention

    config = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    open_clip = CLIPTextModel(CLIPTextConfig(**config, hidden_act="gelu"))  # SD 2's OpenCLIP, in small
    assert warn_partial_open_clip_attention(open_clip, ["q_proj", "v_proj"])
    assert "AUTOMATIC1111 applies a text-encoder LoRA on SD 2.x only where" in caplog.text
    assert not warn_partial_open_clip_attention(open_clip, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    assert not warn_partial_open_clip_attention(open_clip, ["fc1", "fc2"])  # no attention layer: nothing skipped
    assert not warn_partial_open_clip_attention(CLIPTextModel(CLIPTextConfig(**config)), ["q_proj"])  # SD 1.x CLIP


def test_kohya_metadata_of_an_sd2_v_prediction_lora():
    from difftrain.models.lora_files import kohya_metadata, training_metadata

    meta = kohya_metadata(training_metadata({"sd_version": "v2", "prediction_type": "v_prediction",
                                             "zero_terminal_snr": "True", "resolution": "768"}, "sd2-style"), [])
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["ss_v_parameterization"]) == ("True", "sd_v2_v", "True")
    assert meta["ss_zero_terminal_snr"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["modelspec.resolution"] == "768x768"


def test_a_file_from_elsewhere_converted_to_kohya_is_labelled_by_its_widths(tmp_path):
    from safetensors.torch import save_file

    from difftrain.models.lora_files import convert_lora

    def text_encoder_only(width: int):  # a diffusers-format file with only text-encoder layers
        path = tmp_path / f"te-{width}.safetensors"
        save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, width),
                   "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(width, 4)},
                  path)
        return path

    from safetensors import safe_open

    for width, v2 in ((1024, "True"), (768, "False")):  # SD 2.x's OpenCLIP-H, SD 1.x's CLIP-L
        converted = convert_lora(text_encoder_only(width), tmp_path / f"kohya-{width}.safetensors", "kohya")
        with safe_open(str(converted), "pt") as file:
            assert file.metadata()["ss_v2"] == v2
    # A classic q/v LoRA: attn2.to_v takes the context as attn2.to_k does (the first layer that tells decides)
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    for width, v2 in ((1024, "True"), (768, "False")):
        path = tmp_path / f"qv-{width}.safetensors"
        save_file({f"{attn}.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
                   f"{attn}.attn1.to_q.lora_B.weight": torch.zeros(320, 4),
                   f"{attn}.attn2.to_v.lora_A.weight": torch.zeros(4, width),
                   f"{attn}.attn2.to_v.lora_B.weight": torch.zeros(320, 4)}, path)
        with safe_open(str(convert_lora(path, tmp_path / f"qv-kohya-{width}.safetensors", "kohya")), "pt") as file:
            assert (file.metadata()["ss_v2"], file.metadata()["ss_base_model_version"]) == (
                v2, "sd_v2" if v2 == "True" else "sd_v1")


def test_an_alpha_pattern_key_with_or_without_text_model_finds_its_layer(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from difftrain.models.lora_files import convert_lora

    layer = "encoder.layers.0.self_attn.{}_proj"
    tensors = {}
    for name in ("q", "k"):
        tensors[f"text_encoder.text_model.{layer.format(name)}.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"text_encoder.text_model.{layer.format(name)}.lora_B.weight"] = torch.zeros(32, 4)
    for written in (f"text_model.{layer.format('q')}", layer.format("q")):
        header = {"text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.alpha_pattern": {written: 8}}
        path = tmp_path / "te.safetensors"
        save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(header)})
        kohya = load_file(convert_lora(path, tmp_path / "kohya.safetensors", "kohya"))
        alphas = {key: float(value) for key, value in kohya.items() if key.endswith(".alpha")}
        assert alphas == {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": 8.0,
                          "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha": 4.0}, written


def test_a_1x1_conv_lora_fits_a_linear_layer_and_the_other_way_round(tiny_dir, tmp_path):
    """SD 2.x's proj_in/proj_out: 1x1 convolutions in kohya's layout ([rank, in, 1, 1]), Linear in diffusers'
    (use_linear_projection); each file draws on the other model as A1111 and ComfyUI draw it."""
    import json as json_module

    from safetensors.torch import save_file

    from difftrain.models.lora_files import load_lora_adapter

    def lora(folder, four_d: bool):
        generator = torch.Generator().manual_seed(1)
        tensors = {}
        for block in ("down_blocks_0_attentions_0", "up_blocks_1_attentions_0"):
            for proj in ("proj_in", "proj_out"):
                key = f"lora_unet_{block}_{proj}"
                down, up = torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator) * 0.5
                if four_d:
                    down, up = down[:, :, None, None], up[:, :, None, None]
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(2.0)}
        save_file(tensors, folder)
        return folder

    import logging

    warned = []  # diffusers' loggers write to their own handler, past pytest's capture: listened to here
    listener = logging.Handler()
    listener.emit = warned.append
    logging.getLogger("diffusers.loaders.lora_base").addHandler(listener)
    for linear in (False, True):
        model = tmp_path / f"linear-{linear}"
        pipe = load_pipe(tiny_dir)
        config = json_module.loads((tiny_dir / "unet" / "config.json").read_text())
        if config.get("use_linear_projection", False) != linear:  # the other layout of the same weights
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_config({**config, "use_linear_projection": linear})
            state = {k: (v.flatten(1) if linear and v.ndim == 4 and "proj_" in k else
                         v[:, :, None, None] if not linear and v.ndim == 2 and "proj_" in k else v)
                     for k, v in pipe.unet.state_dict().items()}
            unet.load_state_dict(state)
            pipe.unet = unet
        pipe.save_pretrained(model)
        drawn = {}
        for four_d in (False, True):
            pipe = load_pipe(model)
            load_lora_adapter(pipe, lora(tmp_path / f"lora-{linear}-{four_d}.safetensors", four_d), "x")
            drawn[four_d] = image(pipe)
        assert np.abs(drawn[False] - drawn[True]).max() < 1e-5, linear
        assert np.abs(drawn[True] - image(load_pipe(model))).max() > 1e-3  # (the LoRA acts)
    # These LoRAs have no text-encoder layers: diffusers' warning that it found none came at every load.
    logging.getLogger("diffusers.loaders.lora_base").removeHandler(listener)
    assert not [record for record in warned if "No LoRA keys" in record.getMessage()]


def test_a_kohya_text_encoder_lora_without_out_proj_is_warned_of(caplog):
    """diffusers' load_lora_weights misreads such a kohya-layout file (it refused it, or dropped its q/v layers)."""
    from difftrain.models.lora import warn_kohya_text_encoder_layout

    with caplog.at_level("WARNING"):
        assert warn_kohya_text_encoder_layout(["q_proj", "v_proj"])
        assert not warn_kohya_text_encoder_layout(["q_proj", "k_proj", "v_proj", "out_proj"])
    assert caplog.text.count("leave out out_proj: diffusers' load_lora_weights misreads") == 1
