"""LoRA, DreamBooth and Textual Inversion on the tiny Stable Diffusion, end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_text2image import assert_same_tensors, sd_config, tiny_sd, train_straight_and_interrupted  # noqa: F401

from difftrain.cli import main
from difftrain.config import load_config

LORA = {"enabled": True, "rank": 4, "init": "gaussian", "text_encoder": True}


def image(pipe, prompt="a red circle", **kwargs) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0),
               output_type="np", **kwargs)
    return out.images[0]


@pytest.fixture(scope="module")
def lora_run(tiny_sd, shapes_dir, tmp_path_factory):  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("lora")
    config = sd_config(tmp_path, shapes_dir, tiny_sd, lora=LORA, checkpoint={"every_steps": 2},
                       training={"max_steps": 4, "learning_rate": 5e-3, "batch_size": 2,
                                 "gradient_accumulation_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    return tmp_path / "run"


def shapes_dir_of(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]


def test_lora_trains_only_the_adapter_and_writes_both_formats(lora_run, tiny_sd):  # noqa: F811
    model = lora_run / "model"
    assert sorted(p.name for p in model.iterdir()) == ["difftrain.json", "lora.safetensors", "pytorch_lora_weights.safetensors", "scheduler"]
    with safe_open(model / "lora.safetensors", "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_max_train_steps"] == "4"
    # kohya's batch: per device x processes x accumulation (it was the per-device 2)
    assert (metadata["ss_total_batch_size"], metadata["ss_batch_size_per_device"]) == ("4", "2")
    assert metadata["ss_gradient_accumulation_steps"] == "2"
    # kohya's conventions, which A1111's LoRA browser reads: a base name (not the user's path), the run's name,
    # the SD version, tags, tensor hashes and the modelspec block.
    assert metadata["ss_sd_model_name"] == Path(tiny_sd).name and metadata["ss_output_name"] == "run"
    assert metadata["ss_v2"] == "False" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_v_parameterization"] == "False" and "ss_zero_terminal_snr" not in metadata
    tags = json.loads(metadata["ss_tag_frequency"])
    assert list(tags) == [Path(shapes_dir_of(lora_run)).name] and sum(next(iter(tags.values())).values()) == 24
    assert json.loads(metadata["ss_dataset_dirs"])[next(iter(tags))]["img_count"] == 24
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["modelspec.title"] == "run"
    # The checkpoint holds the adapter and its optimizer state only, not the frozen model.
    checkpoint = load_file(lora_run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert checkpoint and all("lora" in key for key in checkpoint)
    optimizer = load_file(lora_run / "checkpoints" / "step-00000004" / "optimizer.safetensors")
    adapter_numel = sum(t.numel() for t in checkpoint.values())
    assert sum(t.numel() for t in optimizer.values() if t.dim() > 0) == 2 * adapter_numel  # exp_avg + exp_avg_sq


def test_saved_lora_changes_the_output_scale_zero_is_the_base_and_kohya_equals_diffusers(lora_run, tiny_sd):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    base = image(StableDiffusionPipeline.from_pretrained(tiny_sd))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(lora_run / "model")
    adapted = image(pipe)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(image(pipe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-6)
    kohya = StableDiffusionPipeline.from_pretrained(tiny_sd)
    kohya.load_lora_weights(str(lora_run / "model" / "lora.safetensors"))
    np.testing.assert_allclose(image(kohya), adapted, atol=1e-5)


def test_merge_then_sample_equals_the_lora_at_that_scale(lora_run, tiny_sd, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    assert main(["lora", "merge", str(tiny_sd), str(lora_run / "model"), str(out), "--scale", "0.5"]) == 0
    merged = image(StableDiffusionPipeline.from_pretrained(out))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(lora_run / "model")
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=0.5)
    np.testing.assert_allclose(merged, image(pipe), atol=1e-4)
    # Run folders on either side: the LoRA run as the LoRA, and as the model, whose own LoRA goes in too (at its
    # weight 1, so with another 0.5 of the same LoRA: 1.5).
    assert main(["lora", "merge", str(tiny_sd), str(lora_run), str(tmp_path / "from-run"), "--scale", "0.5",
                 "--no-progress"]) == 0
    np.testing.assert_allclose(image(StableDiffusionPipeline.from_pretrained(tmp_path / "from-run")), merged, atol=1e-6)
    assert main(["lora", "merge", str(lora_run), str(lora_run), str(tmp_path / "both"), "--scale", "0.5",
                 "--no-progress"]) == 0
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=1.5)
    both = image(StableDiffusionPipeline.from_pretrained(tmp_path / "both"))
    np.testing.assert_allclose(both, image(pipe), atol=1e-4)
    # A merged run draws as the run did: the size (and text length) it trained at stay in its manifest, and the
    # LoRAs baked in are listed as merged, not as adapters to load again.
    from difftrain.models.manifest import read_manifest

    written, trained = read_manifest(tmp_path / "both"), read_manifest(lora_run / "model")
    assert written.kind == "stable-diffusion" and written.loras == [] and written.base is None
    assert written.conditioning == trained.conditioning and trained.conditioning["resolution"] == 16
    assert [weight for _, weight in written.export["loras_merged"]] == [1.0, 0.5]
    sizes = {}
    for model in (lora_run, tmp_path / "both"):
        assert main(["generate", str(model), "--prompt", "a red circle", "--steps", "1", "--out",
                     str(tmp_path / f"drawn-{model.name}"), "--no-progress"]) == 0
        sizes[model.name] = Image.open(next((tmp_path / f"drawn-{model.name}").glob("*.png"))).size
    assert sizes == {lora_run.name: (16, 16), "both": (16, 16)}


def test_convert_round_trip_through_the_cli(lora_run, tmp_path):
    kohya = lora_run / "model" / "lora.safetensors"
    assert main(["lora", "convert", str(kohya), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    before, after = load_file(kohya), load_file(tmp_path / "k.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_resume_is_exact(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    common = dict(lora=LORA, training={"max_steps": 4, "learning_rate": 5e-3}, checkpoint={"every_steps": 2})
    make = lambda name: sd_config(tmp_path, shapes_dir, tiny_sd, name, **common)  # noqa: E731
    straight, resumed = train_straight_and_interrupted(make, tmp_path)
    assert_same_tensors(straight, resumed, ("model.safetensors", "ema.safetensors", "optimizer.safetensors"))


def test_under_mixed_precision_frozen_weights_are_half_and_adapters_fp32(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from difftrain.training.trainer import Trainer

    config = load_config(sd_config(tmp_path, shapes_dir, tiny_sd, lora=LORA, training={"mixed_precision": "bf16"}))
    trainer = Trainer(config, progress=False)
    unet = trainer.method.unet
    trainable = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    # In training mode from the first step (loaded models come in eval mode, where transformers' gradient
    # checkpointing and any dropout do nothing), not only after the first preview.
    assert all(m.training for module in trainer.modules.values() for m in module.modules())
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for m in (unet, trainer.method.text_encoder) for p in m.parameters() if p.requires_grad
    }
    result = trainer.run()
    assert result.loss == result.loss  # not NaN
    assert all(p.grad is None for p in frozen)


def test_unknown_lora_target_names_the_key_and_the_real_layers(tiny_sd, shapes_dir, tmp_path, capsys):  # noqa: F811
    config = sd_config(tmp_path, shapes_dir, tiny_sd, lora={"enabled": True, "unet_targets": ["to_qq"]})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lora.unet_targets" in err and "to_qq" in err and "to_q" in err
    # A layer a LoRA file cannot hold (peft would wrap an embedding, then the final save would fail), or a
    # block rather than a layer: refused before the first step.
    for name, section in [("embedding", {"text_encoder": True,
                                         "text_encoder_targets": ["q_proj", "token_embedding"]}),
                          ("block", {"unet_targets": ["attn1"]})]:
        config = sd_config(tmp_path, shapes_dir, tiny_sd, name, lora={"enabled": True, **section})
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert ("token_embedding is of type Embedding, not Linear or Conv2d" if name == "embedding" else
                "attn1 is of type Attention, not Linear or Conv2d") in err, err
        assert not (tmp_path / name / "checkpoints").exists()


def test_textual_inversion_learns_only_its_rows_and_the_token_works_after_loading(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    config = sd_config(
        tmp_path, shapes_dir, tiny_sd,
        method="textual_inversion",
        textual_inversion={"token": "<shape>", "initializer": "square", "num_vectors": 2},
        training={"max_steps": 3, "learning_rate": 0.05, "weight_decay": 0.01},
        sample={"every_steps": 3, "prompts": ["a photo of <shape>"]},
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    model = tmp_path / "run" / "model"
    assert (model / "learned_embeds.safetensors").is_file() and (model / "shape.safetensors").is_file()
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    original = base.text_encoder.get_input_embeddings().weight.detach().clone()
    initial = original[base.tokenizer.convert_tokens_to_ids("square</w>")]
    base.load_textual_inversion(model)
    table = base.text_encoder.get_input_embeddings().weight.detach()
    assert table.shape[0] == original.shape[0] + 2
    assert torch.equal(table[: original.shape[0]], original)  # every other row bit-identical
    new_rows = table[original.shape[0]:]
    assert not torch.allclose(new_rows[0], initial)  # it learned
    with_token = base.encode_prompt("a photo of <shape>", "cpu", 1, False)[0]
    without = base.encode_prompt("a photo of square", "cpu", 1, False)[0]
    assert not torch.allclose(with_token, without)
    assert image(base, "a photo of <shape>").shape == (16, 16, 3)


def test_textual_inversion_draws_its_templates_as_token_ids_on_the_device(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from difftrain.data.dataset import make_loader
    from difftrain.methods.text2image import tokenize
    from difftrain.training.trainer import Trainer

    config = sd_config(tmp_path, shapes_dir, tiny_sd, method="textual_inversion",
                       textual_inversion={"token": "<shape>", "initializer": "square", "num_vectors": 2})
    trainer = Trainer(load_config(config), progress=False)
    method = trainer.method
    batch = next(iter(make_loader(trainer.dataset, trainer.sampler, 0, method.collate)))
    assert "input_ids" not in batch  # the data's captions are not what it trains on
    parts = method.batch_parts(batch, torch.Generator().manual_seed(0))
    picks = torch.randint(0, len(method.templates), (4,), generator=torch.Generator().manual_seed(0)).tolist()
    captions = [method.templates[i].format("<shape> <shape>_1") for i in picks]
    assert len(set(captions)) > 1
    assert torch.equal(parts["input_ids"], tokenize(method.tokenizer, captions, method.max_length))


def test_textual_inversion_refuses_an_existing_word_or_a_multi_token_initializer(
        tiny_sd, shapes_dir, tmp_path, capsys, caplog):  # noqa: F811
    config = sd_config(tmp_path, shapes_dir, tiny_sd, method="textual_inversion",
                       textual_inversion={"token": "dog", "initializer": "square"})
    assert main(["train", str(config)]) == 2
    assert "already a word" in capsys.readouterr().err
    config = sd_config(tmp_path, shapes_dir, tiny_sd, "b", method="textual_inversion",
                       textual_inversion={"token": "<x>", "initializer": "zebra"})
    assert main(["train", str(config)]) == 2
    assert "exactly one" in capsys.readouterr().err
    # A token that cannot be saved as the A1111 file, refused before the run rather than at its final save;
    # and settings that would do nothing for it.
    for name, token, words in [("c", "<my toy>", "one word without spaces"), ("d", "<*>", "nothing usable"),
                               # (its A1111 file replaced the diffusers one, which then held emb_params)
                               ("g", "learned_embeds", "the name of the diffusers file beside it")]:
        config = sd_config(tmp_path, shapes_dir, tiny_sd, name, method="textual_inversion",
                           textual_inversion={"token": token, "initializer": "square"})
        assert main(["train", str(config)]) == 2
        assert f"textual_inversion.token: token {token!r}: " in (err := capsys.readouterr().err) and words in err
    config = sd_config(tmp_path, shapes_dir, tiny_sd, "e", method="textual_inversion", output={"single_file": True},
                       textual_inversion={"token": "<x>", "initializer": "square"},
                       text2image={"text_encoder_lr": 1e-3})
    assert main(["train", str(config)]) == 2
    assert "text2image.text_encoder_lr, output.single_file with textual_inversion" in capsys.readouterr().err
    # Vectors past the captions' cut-off would never train and be saved as if they had.
    config = sd_config(tmp_path, shapes_dir, tiny_sd, "h", method="textual_inversion", text2image={"max_length": 16},
                       textual_inversion={"token": "<x>", "initializer": "square", "num_vectors": 16})
    assert main(["train", str(config)]) == 2
    assert ("text2image.max_length = 16: the longest caption template with textual_inversion.num_vectors = 16 is 29 "
            "tokens") in capsys.readouterr().err
    # A token whose A1111 file name is a word: A1111 would use the embedding wherever the word is written.
    config = sd_config(tmp_path, shapes_dir, tiny_sd, "f", method="textual_inversion", training={"max_steps": 1},
                       textual_inversion={"token": "<circle>", "initializer": "square"})
    with caplog.at_level("WARNING"):
        assert main(["train", str(config), "--no-progress"]) == 0
    assert "saved for AUTOMATIC1111 as circle.safetensors, and 'circle' is a word" in caplog.text
    assert "text_encoder: 32 trainable parameters (beside " in capsys.readouterr().out  # one vector, not the encoder


def test_dreambooth_counts_the_users_own_class_images_and_says_when_the_folder_holds_more(
        tiny_sd, shapes_dir, tmp_path, caplog):  # noqa: F811
    from difftrain.methods.dreambooth import class_image_name

    (tmp_path / "class").mkdir()
    for i in range(3):  # kohya-style regularisation images of the user's own
        Image.new("RGB", (16, 16), (0, i * 60, 0)).save(tmp_path / "class" / f"reg-{i}.jpg")
    config = dreambooth_config(tmp_path, shapes_dir, tiny_sd, training={"batch_size": 1, "max_steps": 1})
    with caplog.at_level("WARNING"):
        assert main(["train", str(config), "--no-progress"]) == 0
    names = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert names == [class_image_name(0), "reg-0.jpg", "reg-1.jpg", "reg-2.jpg"]  # 4 in all: one drawn
    assert "holds" not in caplog.text
    for i in range(3, 5):
        Image.new("RGB", (16, 16), (0, 0, i * 40)).save(tmp_path / "class" / f"reg-{i}.jpg")
    again = dreambooth_config(tmp_path, shapes_dir, tiny_sd, "again", training={"batch_size": 1, "max_steps": 1})
    with caplog.at_level("WARNING"):
        assert main(["train", str(again), "--no-progress"]) == 0
    assert "holds 6 images, more than num_class_images 4: all 6 train as the class prior" in caplog.text
    # Without prior preservation the class settings do nothing: said, as diffusers' script says it.
    alone = dreambooth_config(tmp_path, shapes_dir, tiny_sd, "alone", dreambooth={"prior_preservation": False},
                              training={"batch_size": 1, "max_steps": 1})
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", str(alone), "--no-progress"]) == 0
    assert ("dreambooth.class_data, dreambooth.class_prompt, dreambooth.num_class_images, dreambooth.prior_loss_weight, "
            "dreambooth.class_steps: set, and not used with dreambooth.prior_preservation false") in caplog.text
    assert len(list((tmp_path / "class").iterdir())) == 6


def dreambooth_config(tmp_path, shapes_dir, tiny_sd, name="run", **sections):  # noqa: F811
    db = {"instance_prompt": "a photo of sks square", "class_prompt": "a photo of a square",
          "class_data": str(tmp_path / "class"), "num_class_images": 4, "class_steps": 2, "prior_loss_weight": 0.5}
    db.update(sections.pop("dreambooth", {}))
    return sd_config(tmp_path, shapes_dir, tiny_sd, name, method="dreambooth", dreambooth=db, **sections)


def test_dreambooth_generates_exactly_the_missing_class_images_and_trains_with_min_snr(tiny_sd, shapes_dir, tmp_path, capsys):  # noqa: F811
    from difftrain.methods.dreambooth import class_image_name

    (tmp_path / "class").mkdir()
    kept = {}
    for i in (0, 2):  # two of four already there: they must not be touched
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tmp_path / "class" / class_image_name(i))
        kept[i] = (tmp_path / "class" / class_image_name(i)).read_bytes()
    config = dreambooth_config(tmp_path, shapes_dir, tiny_sd, noise={"snr_gamma": 5.0},
                               training={"batch_size": 1, "max_steps": 3})
    assert main(["train", str(config), "--no-progress"]) == 0
    names = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert names == [class_image_name(i) for i in range(4)]
    assert all((tmp_path / "class" / class_image_name(i)).read_bytes() == data for i, data in kept.items())
    # Generation is per-image seeded: the images a second, fresh generation makes are the same.
    first = (tmp_path / "class" / class_image_name(1)).read_bytes()
    (tmp_path / "class" / class_image_name(1)).unlink()
    again = dreambooth_config(tmp_path, shapes_dir, tiny_sd, "again", training={"batch_size": 1, "max_steps": 1})
    assert main(["train", str(again), "--no-progress"]) == 0
    assert (tmp_path / "class" / class_image_name(1)).read_bytes() == first
    # They are the images `difftrain generate` draws from the base model with the class settings: one batch
    # of dreambooth.class_batch_size (4), seeds class_seed (0) + i.
    assert main(["generate", str(tiny_sd), "--prompt", "a photo of a square", "--negative-prompt", "", "--seed", "0",
                 "--batch-size", "4", "--steps", "2", "--scheduler", "dpm++_2m", "--cfg", "7.5", "--width", "16",
                 "--height", "16", "--out", str(tmp_path / "generated"), "--no-progress"]) == 0
    generated = sorted((tmp_path / "generated").glob("*.png"))
    for i in (1, 3):
        drawn = np.asarray(Image.open(tmp_path / "class" / class_image_name(i)))
        assert np.array_equal(np.asarray(Image.open(generated[i])), drawn), i
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model")


def test_class_images_are_drawn_in_fixed_batches_under_the_runs_autocast(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from torch.utils._python_dispatch import TorchDispatchMode

    from difftrain.methods import build_method
    from difftrain.methods.dreambooth import class_image_batches, class_image_name

    # The batches holding a missing image, whole, so image i is always drawn beside the same seeds.
    assert class_image_batches([1, 2, 9], count=10, batch_size=4) == [range(0, 4), range(8, 10)]
    assert class_image_batches([], count=10, batch_size=4) == []

    class ConvolutionDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    config = load_config(dreambooth_config(tmp_path, shapes_dir, tiny_sd, training={"mixed_precision": "bf16"},
                                           dreambooth={"num_class_images": 2}))
    method = build_method(config)
    weights = {name: value.clone() for name, value in method.unet.state_dict().items()}
    with ConvolutionDtypes() as seen:
        method.generate_class_images(tmp_path / "class", [range(0, 2)], torch.device("cpu"), torch.bfloat16, False)
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == [class_image_name(0), class_image_name(1)]
    # The UNet ran in bf16 (2 steps x 2 images' guided batch), the VAE decoded in fp32; the weights training
    # starts from were neither cast nor changed.
    assert seen.seen.count(torch.bfloat16) > 0 and torch.float32 in seen.seen
    assert all(value.dtype == torch.float32 and torch.equal(value, weights[name])
               for name, value in method.unet.state_dict().items())


def test_dreambooth_loss_weights_the_class_half(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from difftrain.data.dataset import make_loader
    from difftrain.methods.text2image import tokenize
    from difftrain.training.trainer import Trainer

    config = load_config(dreambooth_config(tmp_path, shapes_dir, tiny_sd, training={"batch_size": 2}))
    trainer = Trainer(config, progress=False)
    method = trainer.method
    batch = next(iter(make_loader(trainer.dataset, trainer.sampler, 0, method.collate)))
    parts = method.batch_parts(batch, torch.Generator().manual_seed(0))
    assert parts["caption"] == ["a photo of sks square"] * 2 + ["a photo of a square"] * 2
    assert torch.allclose(parts["sample_weights"], torch.tensor([0.5, 0.5, 0.25, 0.25]))
    assert parts["pixel_values"].shape[0] == 4
    # Both halves' captions were tokenised in the loader and joined like the pixels: the loss is
    # the one tokenising in the step gives.
    assert torch.equal(parts["input_ids"], tokenize(method.tokenizer, parts["caption"], method.max_length))
    in_step = {key: value for key, value in batch.items() if not key.endswith("input_ids")}
    with torch.no_grad():
        losses = [method.loss(trainer.wrapped, b, torch.Generator().manual_seed(0)) for b in (batch, in_step)]
    assert torch.equal(*losses)


def test_dreambooth_with_lora_and_resume_is_exact(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    common = dict(lora={"enabled": True, "init": "gaussian"}, training={"max_steps": 4, "batch_size": 2},
                  checkpoint={"every_steps": 2})
    make = lambda name: dreambooth_config(tmp_path, shapes_dir, tiny_sd, name, **common)  # noqa: E731
    assert_same_tensors(*train_straight_and_interrupted(make, tmp_path))
    assert (tmp_path / "resumed" / "model" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_on_feed_forward_and_convolution_layers_loads_in_both_formats(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    config = sd_config(tmp_path, shapes_dir, tiny_sd, lora={"enabled": True, "init": "gaussian", "rank": 2,
                                                          "unet_targets": ["to_q", "ff.net.2", "conv1"]},
                       training={"max_steps": 2, "learning_rate": 5e-3})
    assert main(["train", str(config), "--no-progress"]) == 0
    weights = load_file(tmp_path / "run" / "model" / "pytorch_lora_weights.safetensors")
    assert any("conv1" in k for k in weights) and any("ff.net.2" in k for k in weights)
    diffusers_format = StableDiffusionPipeline.from_pretrained(tiny_sd)
    diffusers_format.load_lora_weights(tmp_path / "run" / "model")
    kohya_format = StableDiffusionPipeline.from_pretrained(tiny_sd)
    kohya_format.load_lora_weights(str(tmp_path / "run" / "model" / "lora.safetensors"))
    np.testing.assert_allclose(image(kohya_format), image(diffusers_format), atol=1e-5)


def test_textual_inversion_resume_is_exact(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    common = dict(method="textual_inversion", textual_inversion={"token": "<shape>", "initializer": "square"},
                  training={"max_steps": 4, "learning_rate": 0.05}, checkpoint={"every_steps": 2})
    make = lambda name: sd_config(tmp_path, shapes_dir, tiny_sd, name, **common)  # noqa: E731
    straight, resumed = train_straight_and_interrupted(make, tmp_path)
    assert_same_tensors(straight, resumed)
    a = load_file(tmp_path / "straight" / "model" / "learned_embeds.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "learned_embeds.safetensors")
    assert torch.equal(a["<shape>"], b["<shape>"])
    checkpoint = load_file(resumed / "model.safetensors")
    assert len(checkpoint) == 1 and next(iter(checkpoint)).endswith("token_embedding.vectors")  # nothing else trains


def test_textual_inversion_trains_under_bf16_with_its_vectors_exact(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from difftrain.training.trainer import Trainer

    config = load_config(sd_config(tmp_path, shapes_dir, tiny_sd, method="textual_inversion",
                                   textual_inversion={"token": "<shape>", "initializer": "square"},
                                   training={"mixed_precision": "bf16", "max_steps": 2}))
    from transformers import CLIPTextModel

    trainer = Trainer(config, progress=False)
    method = trainer.method
    base = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder").get_input_embeddings().weight
    start = base[method.tokenizer.convert_tokens_to_ids("square</w>")]
    assert method.unet.dtype == torch.bfloat16 and method.new_tokens.table.weight.dtype == torch.bfloat16
    # The new vectors are the fp32 initializer row exactly, not its bf16 rounding.
    assert method.new_tokens.vectors.dtype == torch.float32 and torch.equal(method.new_tokens.vectors[0], start)
    assert not torch.equal(start, start.bfloat16().float())  # so a round trip would have shown
    result = trainer.run()
    assert result.loss == result.loss  # finite


def test_a_lora_run_generates_with_the_noise_settings_it_trained_with(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    from difftrain import load_pipeline

    config = sd_config(tmp_path, shapes_dir, tiny_sd, lora={"enabled": True}, noise={"prediction_type": "v_prediction"},
                       training={"max_steps": 1})
    assert main(["train", str(config), "--no-progress"]) == 0
    pipe = load_pipeline(tmp_path / "run")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.manifest.kind == "lora" and pipe.manifest.noise["prediction_type"] == "v_prediction"
    assert pipe.get_active_adapters() == ["lora0"]  # the run's own adapter, loaded on its base
    with safe_open(tmp_path / "run" / "model" / "lora.safetensors", "pt") as handle:
        metadata = handle.metadata()  # as kohya writes a v-prediction LoRA's
    assert metadata["ss_v_parameterization"] == "True" and metadata["ss_base_model_version"] == "sd_v1_v"
    assert metadata["modelspec.prediction_type"] == "v"


def test_zero_terminal_snr_models_refuse_samplers_that_ignore_it():
    from difftrain.config import NoiseConfig
    from difftrain.sampling.schedulers import UnknownScheduler, make_scheduler
    from difftrain.training.losses import build_noise_scheduler

    config = dict(build_noise_scheduler(NoiseConfig(zero_terminal_snr=True, prediction_type="v_prediction")).config)
    assert float(make_scheduler("euler", config).alphas_cumprod[-1]) < 1e-6
    with pytest.raises(UnknownScheduler, match="zero-terminal-SNR"):
        make_scheduler("heun", config)


def test_two_processes_draw_the_class_images_between_them_and_train(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    """A real two-process launch: every process lists the class folder before any draws into it (a late one
    planned a shorter list and left batches undrawn), each draws every other batch, and the run trains on all."""
    from launches import accelerate_launch, finish

    from difftrain.methods.dreambooth import class_image_name

    (tmp_path / "class").mkdir()
    Image.new("RGB", (16, 16), (0, 90, 0)).save(tmp_path / "class" / class_image_name(2))  # the user's own
    kept = (tmp_path / "class" / class_image_name(2)).read_bytes()
    config = dreambooth_config(tmp_path, shapes_dir, tiny_sd, training={"batch_size": 1, "max_steps": 2},
                               dreambooth={"num_class_images": 6, "class_batch_size": 2})
    probe = Path(__file__).parent / "slow_listing_probe.py"  # rank 1 lists the folder late
    launched = accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0", str(probe),
                                 "train", "--no-progress", str(config))
    output, _ = finish(launched, timeout=240)
    assert launched.returncode == 0, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == [class_image_name(i) for i in range(6)]
    assert (tmp_path / "class" / class_image_name(2)).read_bytes() == kept
    assert "dreambooth run finished at step 2/2" in output
    # The same images one process draws: each image comes from its own seed, whoever drew it.
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "class", alone)
    for i in (0, 5):
        (alone / class_image_name(i)).unlink()
    again = dreambooth_config(tmp_path, shapes_dir, tiny_sd, "again", training={"batch_size": 1, "max_steps": 1},
                              dreambooth={"num_class_images": 6, "class_batch_size": 2, "class_data": str(alone)})
    assert main(["train", str(again), "--no-progress"]) == 0
    for i in (0, 5):
        assert (alone / class_image_name(i)).read_bytes() == (tmp_path / "class" / class_image_name(i)).read_bytes()
