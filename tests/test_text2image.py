"""Text-to-image and VAE training on the tiny Stable Diffusion, end to end through the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config
from PIL import Image

from difftrain.cli import main
from difftrain.config import load_config


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-sd") / "sd"
    assert main(["model", "tiny-sd", str(out)]) == 0
    return out


def sd_config(tmp_path: Path, data_path: Path, tiny_sd: Path, name: str = "run", **sections) -> Path:
    base = {
        "method": "text2image",
        "model": {"base": str(tiny_sd)},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-4, "lr_warmup_steps": 0},
        "sample": {"every_steps": 1000, "prompts": ["a red circle", "a blue square"], "steps": 2, "scheduler": "ddim"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    config = tiny_config(data_path, tmp_path / name, **base)
    config["model"].pop("preset", None)
    return write_config(tmp_path / f"{name}.yaml", config)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_saves_a_pipeline_diffusers_loads_and_runs(tiny_sd, shapes_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    config = sd_config(
        tmp_path, shapes_dir, tiny_sd,
        noise={"prediction_type": "v_prediction", "snr_gamma": 5.0, "input_perturbation": 0.1},
        text2image={"caption_dropout": 0.5},
        sample={"every_steps": 3},
        output={"single_file": True},
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert "text2image run finished at step 3/3" in capsys.readouterr().out
    assert Image.open(run / "samples" / "step-00000003.png").size[0] > 0
    pipe = StableDiffusionPipeline.from_pretrained(run / "model")
    # The prediction type trained with is what the saved scheduler tells a sampler.
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the base model's sampler class is kept
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)
    # The UNet trained; the frozen VAE did not.
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert not torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)
    assert torch.equal(pipe.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
    single = StableDiffusionPipeline.from_single_file(
        run / "model" / "model.safetensors", config=str(run / "model"), local_files_only=True
    )
    from safetensors import safe_open

    with safe_open(run / "model" / "model.safetensors", "pt") as handle:  # a shared file names no user's folders
        assert handle.metadata()["base_model"] == Path(tiny_sd).name
    assert torch.allclose(single.unet.conv_in.weight.float(), pipe.unet.conv_in.weight, atol=1e-3)
    # `generate` draws at the size the run trained and previewed at (16 px), not the base UNet's 32 px.
    assert main(["generate", str(run), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "drawn"),
                 "--no-progress"]) == 0
    [drawn] = (tmp_path / "drawn").glob("*.png")
    assert Image.open(drawn).size == (16, 16) and pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


def test_cached_and_uncached_runs_compute_the_same_loss(tiny_sd, shapes_dir, tmp_path):
    common = dict(text2image={"caption_dropout": 0.3}, training={"max_steps": 3})
    plain = sd_config(tmp_path, shapes_dir, tiny_sd, "plain", **common)
    cached = sd_config(
        tmp_path, shapes_dir, tiny_sd, "cached", data={"cache": {"latents": True, "text": True}}, **common
    )
    assert main(["train", str(plain), "--no-progress"]) == 0
    assert main(["train", str(cached), "--no-progress"]) == 0
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "cached"), rel=1e-4)
    # 24 images x 2 flips, 12 captions + "".
    assert len(list((tmp_path / "cached" / "cache" / "latents").rglob("*.safetensors"))) == 48
    assert len(list((tmp_path / "cached" / "cache" / "text").rglob("*.safetensors"))) == 13


def test_a_changed_image_invalidates_only_its_cache_entries(tiny_sd, shapes_dir, tmp_path, monkeypatch):
    import hashlib
    from collections import Counter
    from dataclasses import replace

    from difftrain.data.sources import FileSource

    from difftrain.methods.text2image import TextToImage
    from difftrain.training.run_data import open_images

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cache = {"latents": True, "text": True}
    config = load_config(sd_config(tmp_path, data, tiny_sd, data={"random_flip": False, "cache": cache}))
    encoders = TextToImage(config).cache_encoders()
    reads = Counter()
    real_read = FileSource.read
    monkeypatch.setattr(FileSource, "read", lambda source, index: reads.update([index]) or real_read(source, index))
    first = open_images(config, progress=False).fill_cache(encoders, tmp_path / "cache", progress=False)
    assert first["latents computed"] == 24 and first["texts computed"] == 13
    assert reads == Counter(range(24))  # read to be encoded, never to be hashed: the folder scan hashed them
    assert not (tmp_path / "cache" / "records").exists()  # so no record summary either (record_summary.py)
    reads.clear()
    Image.new("RGB", (16, 16), (0, 0, 0)).save(data / "000005.png")
    again = open_images(config, progress=False).fill_cache(encoders, tmp_path / "cache", progress=False)
    assert again["latents computed"] == 1 and again["latents found"] == 23 and again["texts computed"] == 0
    assert reads == Counter([5])  # a start with a full cache reads only what changed
    # A cache file cut short is found at the start and computed again (it counted as found, then broke a step)
    for kind in ("latents", "text"):
        damaged = sorted((tmp_path / "cache" / kind).rglob("*.safetensors"))[0]
        damaged.write_bytes(damaged.read_bytes()[:100])
    mended = open_images(config, progress=False).fill_cache(encoders, tmp_path / "cache", progress=False)
    assert (mended["latents computed"], mended["texts computed"]) == (1, 1)
    # A new resolution is a different latent for every image; one changed between the scan and the encode is
    # encoded, and keyed, as read.
    config.data.resolution = 8
    data_set = open_images(config, progress=False)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "000007.png")
    resized = data_set.fill_cache(replace(encoders, texts=None), tmp_path / "cache", progress=False)
    assert resized["latents computed"] == 24
    assert data_set.hashes[7].tobytes() == hashlib.sha256((data / "000007.png").read_bytes()).digest()


def test_a_cached_start_over_unchanged_shards_reads_no_shard(tiny_sd, shapes_dir, tmp_path):
    import os

    from difftrain.methods.text2image import TextToImage
    from difftrain.training.run_data import open_images

    import io
    import tarfile

    shards = tmp_path / "shards"
    assert main(["data", "build", str(shapes_dir), str(shards), "--format", "webdataset", "--per-shard", "10"]) == 0
    # One PNG cut short after its header: indexed (its size reads), but it does not decode.
    tar_path = sorted(shards.glob("*.tar"))[1]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        images = [member.name for member, _ in members if member.name.endswith(".png")]
        for member, payload in members:
            if member.name == images[2]:  # the shard's third record, the data set's 13th
                payload = payload[:60]
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    config = load_config(sd_config(tmp_path, shards / "filelist.txt", tiny_sd,
                                   data={"source": "webdataset", "captions": "auto", "random_flip": False,
                                         "cache": {"latents": True, "text": True}}))
    encoders = TextToImage(config).cache_encoders()
    first = open_images(config, progress=False)
    counts = first.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert counts["latents computed"] == 23 and counts["skipped"] == 1 and first.source.shard_loads == 3
    again = open_images(config, progress=False)
    counts = again.fill_cache(encoders, tmp_path / "cache", progress=False)
    # Hashes and captions from the first walk's summary: no shard read, the broken record skipped unread, the same
    # keys and captions, and the same latent drawn in the broken record's place.
    assert counts["latents found"] == 23 and counts["skipped"] == 1 and counts["texts computed"] == 0
    assert again.source.shard_loads == 0
    assert list(again.captions) == [c if i != 12 else [] for i, c in enumerate(first.captions)]
    broken = next(i for i in range(24) if not again.hashes[i].any())
    assert broken == 12 and np.array_equal(np.delete(again.hashes, 12, 0), np.delete(first.hashes, 12, 0))
    stand_in = open_images(config, progress=False)._read(12)[0]  # what the uncached path reads in its place
    assert again._cached_latent(12, False)[0] == first._cached_latent(12, False)[0] == stand_in != 12
    # A shard written again is a new fingerprint: the walk reads the data again, and keys what it reads.
    shard = sorted(shards.glob("*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    changed = open_images(config, progress=False)
    changed.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert changed.source.shard_loads == 3 and np.array_equal(changed.hashes, first.hashes)
    # The first fingerprint's summary is gone with it: summaries do not pile up as the data changes.
    (summary,) = (tmp_path / "cache" / "records").glob("*.npz")
    # A summary cut short (a crash after its rename: it is written without fsync) is read past, and written again.
    summary.write_bytes(summary.read_bytes()[:100])
    cut = open_images(config, progress=False)
    cut.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert cut.source.shard_loads == 3 and np.array_equal(cut.hashes, first.hashes)
    mended = open_images(config, progress=False)
    assert mended.fill_cache(encoders, tmp_path / "cache", progress=False) == counts
    assert mended.source.shard_loads == 0
    # One process of several decodes only its share, so cannot know every broken record: it writes no summary;
    # the launch's second walk, in which each process takes every record, does.
    # That second walk reuses the hashes of its process's first one: it reads only what its cache lacks, here the
    # shard of the broken record, which the other process decoded.
    shared = tmp_path / "launch-cache"
    processes = [open_images(config, progress=False) for _ in range(2)]
    for rank, process in enumerate(processes):
        process.fill_cache(encoders, shared, rank=rank, world_size=2, progress=False)
    assert not (shared / "records").exists()
    loads = processes[1].source.shard_loads
    assert processes[1].fill_cache(encoders, shared, rank=0, world_size=1, progress=False) == counts
    assert processes[1].source.shard_loads - loads == 1 and np.array_equal(processes[1].hashes, first.hashes)
    assert len(list((shared / "records").glob("*.npz"))) == 1
    after_launch = open_images(config, progress=False)
    assert after_launch.fill_cache(encoders, shared, progress=False) == counts  # the broken record known
    assert after_launch.source.shard_loads == 0
    # Captions off: another summary (every record uncaptioned), not the first one's captions.
    config.data.captions = "none"
    uncaptioned = open_images(config, progress=False)
    uncaptioned.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert uncaptioned.source.shard_loads == 3 and set(map(tuple, uncaptioned.captions)) == {()}
    assert len(list((tmp_path / "cache" / "records").glob("*.npz"))) == 2  # the captioned one is still wanted


def test_records_that_do_not_decode_are_replaced_unread_by_what_the_uncached_path_reads(tiny_sd, tmp_path):
    import io
    import tarfile

    from difftrain.methods.text2image import TextToImage
    from difftrain.training.run_data import open_images

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):  # landscape and portrait in turn: two buckets
        Image.new("RGB", (64, 32) if i % 2 else (32, 64), (i * 20, 0, 0)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"shape {i}")
    shards = tmp_path / "shards"
    assert main(["data", "build", str(data), str(shards), "--format", "webdataset", "--per-shard", "12"]) == 0
    [tar_path] = shards.glob("*.tar")
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    images = [member.name for member, _ in members if member.name.endswith(".png")]
    with tarfile.open(tar_path, "w") as tar:
        for member, payload in members:
            if member.name in images[5:7]:  # records 5 and 6 cut short after their headers
                payload = payload[:60]
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    config = load_config(sd_config(tmp_path, shards / "filelist.txt", tiny_sd,
                                   data={"source": "webdataset", "captions": "auto", "random_flip": False,
                                         "resolution": 32, "buckets": {"enabled": True, "step": 8},
                                         "cache": {"latents": True, "text": True}}))
    encoders = TextToImage(config).cache_encoders()
    open_images(config, progress=False).fill_cache(encoders, tmp_path / "cache", progress=False)
    cached = open_images(config, progress=False)
    counts = cached.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert cached.source.shard_loads == 0 and counts["skipped"] == 2 and counts["latents computed"] == 0
    # Records 5 and 6 are drawn as the uncached path reads them (records.read_order), at their own buckets,
    # which for one of them is not its stand-in's.
    uncached = open_images(config, progress=False)
    stand_ins = [uncached._read(index)[0] for index in (5, 6)]
    assert [cached._cached_latent(index, False)[0] for index in (5, 6)] == stand_ins and not {5, 6} & set(stand_ins)
    assert any(uncached.target_size(index) != uncached.target_size(stand_in) for index, stand_in in zip((5, 6),
                                                                                                       stand_ins))


@pytest.mark.parametrize("shard_format", ["laion", "webdataset"])
def test_trains_from_shards_and_reports_a_corrupt_record(shard_format, tiny_sd, shapes_dir, tmp_path, capsys):
    import tarfile

    shards = tmp_path / "shards"
    assert main(["data", "build", str(shapes_dir), str(shards), "--format", shard_format, "--per-shard", "10"]) == 0
    if shard_format == "laion":
        part = sorted(shards.glob("part-*"))[0]
        import gzip

        lines = gzip.decompress(part.read_bytes()).decode().splitlines()
        lines[3] = "a broken record\t0\tnot-base64-@@@"
        part.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    else:
        tar_path = sorted(shards.glob("*.tar"))[0]
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w") as tar:
            for member, payload in members:
                if member.name.endswith(".png") and member.name.startswith(members[6][0].name.split(".")[0]):
                    payload = b"garbage, not an image"
                    member.size = len(payload)
                import io

                tar.addfile(member, io.BytesIO(payload))
    config = sd_config(
        tmp_path, shards / "filelist.txt", tiny_sd, data={"source": shard_format, "captions": "auto"},
        training={"max_steps": 7},
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "run finished at step 7/7" in out
    report = (tmp_path / "run" / "data_report.txt").read_text()
    assert "23 records, 1 skipped at start" in out
    assert "skipped" in report and ("part-00000" in report or "shard-000000" in report)


def test_from_scratch_unet_with_trained_text_encoder_and_its_own_lr(tiny_sd, shapes_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    unet_config = dict(UNet2DConditionModel.load_config(tiny_sd / "unet"))
    unet_config["block_out_channels"] = [16, 32]
    unet_config["norm_num_groups"] = 16
    (tmp_path / "unet.json").write_text(json.dumps(unet_config))
    config = sd_config(
        tmp_path, shapes_dir, tiny_sd,
        model={"unet": str(tmp_path / "unet.json")},
        text2image={"train_text_encoder": True, "text_encoder_lr": 1e-5},
        training={"max_steps": 2, "gradient_checkpointing": True, "ema": {"enabled": False}},
        output={"trained_only": True},
    )
    from difftrain.training.trainer import Trainer

    trainer = Trainer(load_config(config), progress=False)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-4, 1e-5]
    assert trainer.method.unet.is_gradient_checkpointing
    trainer.run()
    saved = sorted(p.name for p in (tmp_path / "run" / "model").iterdir())
    assert saved == ["difftrain.json", "scheduler", "text_encoder", "unet"]  # the trained parts only
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "model" / "unet")
    assert list(unet.config.block_out_channels) == [16, 32]
    # A resume that halves training.learning_rate halves the UNet's rate; the text encoder keeps its own.
    lowered = load_config(config).model_copy(deep=True)
    lowered.training.learning_rate = 5e-5
    resumed = Trainer(lowered, progress=False, resume="latest")
    resumed.load_checkpoint(resumed.store.resolve("latest"))
    assert [group["lr"] for group in resumed.optimizer.param_groups] == pytest.approx([5e-5, 1e-5])
    assert resumed.lr_schedule.base_lrs == pytest.approx([5e-5, 1e-5])


def train_straight_and_interrupted(make_config, tmp_path: Path, steps: int = 4) -> tuple[Path, Path]:
    """Train `steps` straight, and `steps / 2` then resume to `steps`; return both runs' last checkpoints."""
    straight, resumed = make_config("straight"), make_config("resumed")
    assert main(["train", str(straight), "--no-progress"]) == 0
    assert main(["train", str(resumed), "--no-progress", "--set", f"training.max_steps={steps // 2}"]) == 0
    assert main(["train", str(resumed), "--no-progress", "--resume", "latest"]) == 0
    last = f"step-{steps:08d}"
    return tmp_path / "straight" / "checkpoints" / last, tmp_path / "resumed" / "checkpoints" / last


def assert_same_tensors(a: Path, b: Path, names=("model.safetensors", "optimizer.safetensors")) -> None:
    from safetensors.torch import load_file

    for name in names:
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name


def test_resume_is_exact_for_text2image(tiny_sd, shapes_dir, tmp_path):
    common = dict(text2image={"caption_dropout": 0.3}, training={"max_steps": 4}, checkpoint={"every_steps": 2})
    make = lambda name: sd_config(tmp_path, shapes_dir, tiny_sd, name, **common)  # noqa: E731
    assert_same_tensors(*train_straight_and_interrupted(make, tmp_path), names=("model.safetensors", "ema.safetensors"))


def test_compiling_only_the_repeated_blocks_trains_resumes_exactly_and_saves_the_usual_keys(shapes_dir, tmp_path,
                                                                                          capsys):
    """training.compile_scope: blocks compiles the UNet's transformer blocks alone (diffusers' regional
    compilation); the rest runs eager, checkpoints keep plain keys, resume is exact, and the scope is a
    setting a resume may not change (the kernels round differently)."""
    from diffusers import UNet2DConditionModel

    from difftrain.models.tiny_sd import write_tiny_sd

    # One level, so one block, the mid block's: 14 kernels to compile, not 25, which a cold kernel cache (CI's)
    # takes 41 CPU-s for, not 66.
    model = write_tiny_sd(tmp_path / "one-level", unet_channels=(16,), sample_size=16)
    common = dict(training={"max_steps": 4, "compile": True, "compile_scope": "blocks"},
                  checkpoint={"every_steps": 2})
    make = lambda name: sd_config(tmp_path, shapes_dir, model, name, **common)  # noqa: E731
    straight, resumed = train_straight_and_interrupted(make, tmp_path)
    out = capsys.readouterr().out
    blocks = sum(type(m).__name__ == "BasicTransformerBlock"
                 for m in UNet2DConditionModel.from_pretrained(model, subfolder="unet").modules())
    assert blocks > 0 and out.count(f"torch.compile (unet: {blocks} BasicTransformerBlock blocks)") == 3, out
    assert_same_tensors(straight, resumed, names=("model.safetensors", "optimizer.safetensors"))
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "model", subfolder="unet")
    assert not any("_orig_mod" in key for key in saved.state_dict())
    assert main(["train", str(make("resumed")), "--resume", "latest", "--set", "training.compile_scope=model"]) == 2
    assert "training.compile_scope: checkpoint has 'blocks', this config has 'model'" in capsys.readouterr().err


def test_blocks_wrapped_by_fsdp_are_still_the_blocks_compiled(tiny_sd):
    """FSDP 2 turns each block it wraps into a subclass named FSDP<name>: found by ancestry, not by name."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    from difftrain.training.optim import compile_modules

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:  # as torch's fully_shard does
        block.__class__ = type(f"FSDP{BasicTransformerBlock.__name__}", (BasicTransformerBlock,), {})
    assert compile_modules({"unet": unet}, "blocks") == [f"unet: {len(blocks)} BasicTransformerBlock blocks"]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert unet._compiled_call_impl is None and unet.conv_in._compiled_call_impl is None  # the rest eager


class _Convolutions(torch.nn.Sequential):
    def forward(self, x):  # dynamo traces a subclass's forward; torch.nn.Sequential's own it leaves eager
        for layer in self:
            x = layer(x)
        return x


def test_a_model_compiled_to_train_on_a_cpu_hands_autograd_gradients_in_its_parameters_layout():
    """Inductor's channels_last convolutions gave 3x3 weight gradients a layout of their own, which autograd
    copied into the parameters' every step (~33 ms of a cached SD-quarter step on a CPU)."""
    from difftrain.training.optim import compile_modules

    torch.manual_seed(0)
    model = _Convolutions(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    arriving = {}
    for name, parameter in model.named_parameters():  # a leaf's hook sees the gradient before autograd keeps it
        parameter.register_hook(lambda grad, name=name: arriving.__setitem__(name, grad.stride()))
    assert compile_modules({"unet": model}) == ["unet whole"]
    model(torch.randn(2, 4, 16, 16)).square().mean().backward()
    assert model._compiled_call_impl is not None and len(arriving) == 4
    assert arriving == {name: parameter.stride() for name, parameter in model.named_parameters()}


def test_bucketing_gives_portrait_and_landscape_images_their_own_buckets(tiny_sd, tmp_path):
    from difftrain.training.run_data import build_sampler, open_images

    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, size in enumerate([(64, 32)] * 4 + [(32, 64)] * 4 + [(32, 32)] * 4):
        Image.new("RGB", size, (i * 20, 0, 0)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": "a red square"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = sd_config(
        tmp_path, data, tiny_sd, data={"resolution": 32, "buckets": {"enabled": True, "step": 8}},
        training={"batch_size": 2, "max_steps": 3},
    )
    dataset = open_images(load_config(config), progress=False)
    batches = iter(build_sampler(load_config(config), dataset, 0, 1))
    shapes = set()
    for _ in range(6):
        keys = next(batches)
        sizes = {tuple(dataset[k]["pixel_values"].shape) for k in keys}
        assert len(sizes) == 1  # one bucket per batch
        shapes |= sizes
    # 32 px buckets in steps of 8 with ratio <= 2: 2:1 images go to 40x24, 1:2 to 24x40.
    assert shapes == {(3, 24, 40), (3, 40, 24), (3, 32, 32)}
    assert main(["train", str(config), "--no-progress"]) == 0


def test_no_upscale_buckets_train_each_image_at_its_own_size_or_smaller(tiny_sd, tmp_path, capsys):
    from difftrain.training.run_data import build_sampler, open_images

    data = tmp_path / "data"
    data.mkdir()
    sizes = [(24, 17)] * 3 + [(41, 24)] * 3 + [(64, 64)] * 2 + [(20, 12)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 20, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square")
    path = sd_config(tmp_path, data, tiny_sd, training={"batch_size": 2, "max_steps": 3},
                     data={"resolution": 32, "buckets": {"enabled": True, "step": 8, "no_upscale": True}})
    config = load_config(path)
    dataset = open_images(config, progress=False)
    sampler = build_sampler(config, dataset, 0, 1)
    shapes = {tuple(dataset[key]["pixel_values"].shape) for batch in sampler.epoch_batches(0)
              for key in [(0, 0, int(index)) for index in batch]}
    # Within 32 x 32 pixels floored to 8s; 64 x 64 scaled to 32 x 32 first.
    assert shapes == {(3, 16, 24), (3, 24, 40), (3, 32, 32), (3, 8, 16)}
    assert main(["train", str(path), "--no-progress"]) == 0
    assert ("buckets     4 in use, 3 records in the fullest; 1 hold fewer records than a batch (2)"
            in capsys.readouterr().out)


def test_vae_method_trains_and_saves_an_autoencoder_diffusers_loads(shapes_dir, tmp_path):
    from diffusers import AutoencoderKL

    vae_config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
    }
    (tmp_path / "vae.json").write_text(json.dumps(vae_config))
    settings = tiny_config(shapes_dir, tmp_path / "run", method="vae", model={"vae": str(tmp_path / "vae.json")},
                           training={"max_steps": 3}, sample={"every_steps": 3})
    del settings["model"]["preset"]  # a pixel UNet's: refused with method vae
    config = write_config(tmp_path / "vae.yaml", settings)
    assert main(["train", str(config), "--no-progress"]) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "model")
    assert vae.config.scaling_factor != 0.18215  # measured on the data, not SD's constant
    assert Image.open(tmp_path / "run" / "samples" / "step-00000003.png").size[0] > 0


def test_vae_and_pixel_runs_refuse_what_they_would_ignore_or_fail_on_and_a_changed_model_json(shapes_dir, tmp_path,
                                                                                              capsys):
    """Each of these trained without a word (another method's keys, a VAE's noise settings and single file), or
    failed at the first step deep inside torch (1 channel, an odd size, a class-conditional UNet's config without
    classes); a model .json edited between a run and its resume went on under the new settings."""
    vae_json = tmp_path / "vae.json"
    vae_json.write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [16, 16],
                                    "down_block_types": ["DownEncoderBlock2D"] * 2, "layers_per_block": 1,
                                    "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8}))
    vae = tiny_config(shapes_dir, tmp_path / "vae", method="vae", model={"vae": str(vae_json)},
                      training={"max_steps": 2}, sample={"every_steps": 2, "num_images": 4})
    del vae["model"]["preset"]
    vae_config = write_config(tmp_path / "vae.yaml", vae)
    pixel_config = write_config(tmp_path / "pixel.yaml", tiny_config(shapes_dir, tmp_path / "pixel"))
    (tmp_path / "classes.json").write_text(json.dumps({"num_class_embeds": 4, "block_out_channels": [16, 32],
                                                        "down_block_types": ["DownBlock2D"] * 2,
                                                        "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 8}))
    deep = {"block_out_channels": [8] * 5, "norm_num_groups": 8, "layers_per_block": 1}  # halves 4 times
    (tmp_path / "deep-vae.json").write_text(json.dumps({**deep, "down_block_types": ["DownEncoderBlock2D"] * 5,
                                                         "up_block_types": ["UpDecoderBlock2D"] * 5}))
    (tmp_path / "deep-unet.json").write_text(json.dumps({**deep, "down_block_types": ["DownBlock2D"] * 5,
                                                          "up_block_types": ["UpBlock2D"] * 5}))
    refusals = [
        (vae_config, ["model.unet=unet.json"], "model.unet: it is read by Stable Diffusion methods"),
        (vae_config, ["model.preset=mini"], "model.preset: it is read by the unconditional method's pixel UNet"),
        (vae_config, ["noise.snr_gamma=5"], "noise.snr_gamma with method vae"),
        (vae_config, ["output.single_file=true"], "output.single_file with method vae"),
        (vae_config, [f"model.vae={tmp_path / 'deep-vae.json'}", "data.resolution=24"],
         "deep-vae.json halves an image 4 times (x1/16); give a multiple of 16"),
        (pixel_config, ["model.base=ddpm-cifar10"], "model.base: it is read by Stable Diffusion methods"),
        (pixel_config, ["model.channels=1"], "model.channels = 1: images are read as RGB"),
        (pixel_config, [f"model.unet_config={tmp_path / 'deep-unet.json'}", "data.resolution=24"],
         "deep-unet.json) halves an image 4 times (x1/16)"),
        (pixel_config, [f"model.unet_config={tmp_path / 'classes.json'}"], "is a class-conditional UNet's"),
    ]
    for config, settings, message in refusals:
        assert main(["train", str(config), "--no-progress", *(f"--set={item}" for item in settings)]) == 2, settings
        assert message in capsys.readouterr().err, settings

    assert main(["train", str(vae_config), "--no-progress"]) == 0
    grid = Image.open(tmp_path / "vae" / "samples" / "step-00000002.png")
    assert grid.size == (4 * 130 + 2, 2 * 130 + 2)  # each original beside its reconstruction: 4 columns, not 3
    assert main(["sample", str(tmp_path / "vae" / "checkpoints" / "step-00000002"), "--out", str(tmp_path / "x.png")
                 ]) == 2
    assert "a training checkpoint of a run" in capsys.readouterr().err
    vae_json.write_text(vae_json.read_text().replace('"layers_per_block": 1', '"layers_per_block": 1, '
                                                                              '"act_fn": "relu"'))
    assert main(["train", str(vae_config), "--no-progress", "--resume", "latest", "--set", "training.max_steps=4"]) == 2
    assert "vae.act_fn: checkpoint has 'silu', this run builds 'relu'" in capsys.readouterr().err


def test_config_errors_for_text2image_name_the_key(tmp_path, shapes_dir, tiny_sd, capsys):
    bad = sd_config(tmp_path, shapes_dir, tiny_sd, data={"cache": {"latents": True}, "crop": "random"})
    assert main(["train", str(bad)]) == 2
    assert "data.crop = random" in capsys.readouterr().err
    no_base = sd_config(tmp_path, shapes_dir, tiny_sd, "nobase", model={"base": None})
    assert main(["train", str(no_base)]) == 2
    assert "set model.base" in capsys.readouterr().err
    missing = sd_config(tmp_path, shapes_dir, tiny_sd, "missing", model={"base": str(tmp_path / "nowhere")})
    assert main(["train", str(missing)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_several_captions_per_image_are_drawn_per_sample_from_a_jsonl(tiny_sd, shapes_dir, tmp_path):
    from difftrain.training.run_data import open_images

    lines = [json.dumps({"image": str(shapes_dir / f"{i:06d}.png"), "caption": [f"first {i}", f"second {i}"]})
             for i in range(6)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = load_config(sd_config(tmp_path, tmp_path / "data.jsonl", tiny_sd, data={"source": "jsonl"}))
    dataset = open_images(config, progress=False)
    drawn = {dataset[(epoch, 0, 0)]["caption"] for epoch in range(12)}
    assert drawn == {"first 0", "second 0"}
    assert dataset[(3, 0, 0)]["caption"] == dataset[(3, 0, 0)]["caption"]  # seeded per (epoch, record)
    assert main(["train", str(sd_config(tmp_path, tmp_path / "data.jsonl", tiny_sd, "jsonl-run",
                                        data={"source": "jsonl"})), "--no-progress"]) == 0


def test_frozen_parts_are_held_in_the_compute_dtype_and_trained_ones_in_fp32(tiny_sd, shapes_dir, tmp_path):
    from difftrain.training.trainer import Trainer

    config = load_config(sd_config(tmp_path, shapes_dir, tiny_sd, training={"mixed_precision": "bf16"}))
    diffusers_log, records = logging.getLogger("diffusers"), []  # every diffusers module's records reach it
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_log.addHandler(handler)
    try:
        trainer = Trainer(config, progress=False)
    finally:
        diffusers_log.removeHandler(handler)
    # diffusers 0.42 warns "modules that should be kept in float32: []" on every cast of a model: filtered out
    assert not [r for r in records if "kept in float32" in r.getMessage()]
    assert trainer.method.text_encoder.dtype == torch.bfloat16 and trainer.method.vae.dtype == torch.bfloat16
    assert trainer.method.unet.dtype == torch.float32
    result = trainer.run()
    assert result.loss is not None and result.loss == result.loss  # finite, not NaN
    # The timings the step benchmarks read (rates after the first step leave its warm-up out).
    assert 0 < result.first_step_seconds < result.loop_seconds and result.startup_seconds > 0


def test_frozen_weights_reach_the_device_already_in_the_compute_dtype(tiny_sd):  # noqa: F811
    """A LoRA run's frozen UNet crosses to the device in bf16, tensor by tensor: moved in fp32 and cast
    there, the whole fp32 UNet sat on the GPU once, the run's peak memory. The meta device stands in for
    a GPU; every copy onto it is recorded with the dtype it arrives in."""
    from diffusers import UNet2DConditionModel
    from torch.utils._python_dispatch import TorchDispatchMode

    from difftrain.methods.text2image import _hold

    class Arrivals(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].device.type != "meta" and out.device.type == "meta":
                self.dtypes.append(out.dtype)
            return out

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").requires_grad_(False)
    unet.conv_out.weight.requires_grad_(True)  # as an adapter's weights: trained, so kept in fp32
    tensors = sum(1 for _ in unet.parameters()) + sum(1 for _ in unet.buffers())
    with Arrivals() as arrivals:
        _hold(unet, torch.device("meta"), torch.bfloat16)
    # Every tensor arrives in bf16; only the trained weight then comes again in fp32, its kept value.
    assert arrivals.dtypes.count(torch.bfloat16) == tensors and arrivals.dtypes.count(torch.float32) == 1
    trained = unet.conv_out.weight
    assert trained.requires_grad and trained.device.type == "meta" and trained.dtype == torch.float32
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="deepspeed gives its CPU notice only without a GPU")
def test_deepspeeds_cpu_notice_shows_only_in_a_deepspeed_launch(monkeypatch):
    # Saving a text encoder makes accelerate import deepspeed, which then printed its accelerator
    # guess ("Setting accelerator to CPU ...") in every text-to-image run on a CPU.
    import difftrain  # noqa: F401  (its filter)
    from deepspeed.accelerator import real_accelerator

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(handler)
    try:
        for deepspeed_launch in ("false", "true"):
            monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", deepspeed_launch)
            monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # guess again, as a fresh process does
            real_accelerator.get_accelerator()
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:27] for r in records] == ["Setting accelerator to CPU."]  # the launch's only


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_captions_tokenised_in_the_data_loader_give_the_step_the_same_loss(train_text_encoder, tiny_sd, shapes_dir,
                                                                           tmp_path):
    from difftrain.data.dataset import make_loader
    from difftrain.methods.text2image import tokenize
    from difftrain.training.trainer import Trainer

    config = load_config(sd_config(tmp_path, shapes_dir, tiny_sd, text2image={
        "caption_dropout": 0.5, "train_text_encoder": train_text_encoder}))
    trainer = Trainer(config, progress=False)
    method = trainer.method
    # In a worker process: the collate function and its tokenizer travel by pickle.
    batch = next(iter(make_loader(trainer.dataset, trainer.sampler, 1, method.collate)))
    assert torch.equal(batch["input_ids"], tokenize(method.tokenizer, batch["caption"], method.max_length))
    seed = 1  # its first draw drops some captions of the four and keeps others: both branches of the select
    dropped = (torch.rand(4, generator=torch.Generator().manual_seed(seed)) < 0.5).tolist()
    assert any(dropped) and not all(dropped)
    in_step = {key: value for key, value in batch.items() if key != "input_ids"}
    with torch.no_grad():
        losses = [method.loss(trainer.wrapped, b, torch.Generator().manual_seed(seed)) for b in (batch, in_step)]
        # The reference for the dropout itself: those captions written as "" and tokenised in the step,
        # with nothing dropped (the draw is still made, so every later draw is the same).
        blanked = {**in_step, "caption": ["" if drop else caption for drop, caption in zip(dropped, batch["caption"])]}
        method.caption_dropout = 0.0
        reference = method.loss(trainer.wrapped, blanked, torch.Generator().manual_seed(seed))
    assert torch.equal(*losses)
    assert torch.equal(losses[0], reference)
    # With the text cached, the batch brings embeddings and nothing tokenises.
    cached = Trainer(load_config(sd_config(tmp_path, shapes_dir, tiny_sd, "cached", data={"cache": {"text": True}})),
                     progress=False)
    assert "input_ids" not in next(iter(make_loader(cached.dataset, cached.sampler, 0, cached.method.collate)))


def test_the_frozen_vae_encodes_in_channels_last_to_the_latents_diffusers_gives(tiny_sd, shapes_dir, tmp_path):
    from diffusers import AutoencoderKL

    from difftrain.training.trainer import Trainer

    method = Trainer(load_config(sd_config(tmp_path, shapes_dir, tiny_sd)), progress=False).method
    weight = method.vae.encoder.conv_in.weight
    # channels_last on CPUs only: on a GPU it measured slower (encoder_channels_last's docstring)
    on_cpu = method.device.type == "cpu"
    assert weight.is_contiguous(memory_format=torch.channels_last) == on_cpu and weight.is_contiguous() != on_cpu
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = method.latent_distribution(pixels)
    with torch.no_grad():
        plain = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").to(method.device).encode(
            pixels.to(method.device)).latent_dist
    tolerance = 1e-5 if method.device.type == "cpu" else 1e-2  # cuDNN may compute in TF32
    assert (mean - plain.mean).abs().max() < tolerance and (std - plain.std).abs().max() < tolerance


def test_a_single_file_of_a_schedule_its_config_cannot_say_is_refused_before_training(tiny_sd, shapes_dir, tmp_path,
                                                                                      capsys):  # noqa: F811
    """(It was written as SD's scaled-linear schedule, and A1111, ComfyUI and diffusers sampled it with that.)"""
    config = sd_config(tmp_path, shapes_dir, tiny_sd, noise={"beta_schedule": "cosine",
                                                              "prediction_type": "v_prediction"},
                       output={"single_file": True})
    assert main(["train", str(config), "--no-progress"]) == 2
    assert ("output.single_file: this run's noise schedule (beta_schedule squaredcos_cap_v2) is not one an A1111 "
            "checkpoint's config says") in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_bitsandbytes_and_xformers_are_named(tiny_sd, shapes_dir, tmp_path, capsys):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        config = sd_config(tmp_path, shapes_dir, tiny_sd, training={"optimizer": "adamw_8bit"})
        assert main(["train", str(config)]) == 2
        assert "bitsandbytes" in capsys.readouterr().err
    try:
        import xformers  # noqa: F401
    except ImportError:
        config = sd_config(tmp_path, shapes_dir, tiny_sd, "x", training={"attention": "xformers"})
        assert main(["train", str(config)]) == 2
        assert "xformers" in capsys.readouterr().err


def test_changed_data_is_refused_before_the_cache_fills(tiny_sd, shapes_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    config = sd_config(tmp_path, data, tiny_sd, data={"random_flip": False, "cache": {"latents": True}},
                       training={"max_steps": 2}, checkpoint={"every_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    latents = tmp_path / "run" / "cache" / "latents"
    before = sorted(latents.rglob("*.safetensors"))
    Image.new("RGB", (16, 16), (0, 0, 0)).save(data / "000005.png")
    assert main(["train", str(config), "--resume", "latest", "--set", "training.max_steps=4", "--no-progress"]) == 2
    assert "000005.png" in capsys.readouterr().err
    assert sorted(latents.rglob("*.safetensors")) == before  # the changed image was never encoded


def test_a_weight_fingerprint_does_not_depend_on_memory_layout():
    """The cache's key hashes values in order: a channels_last copy of the same weights is the same model."""
    from difftrain.data.cache import fingerprint

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 8, 1)
    before = fingerprint(conv)
    conv.to(memory_format=torch.channels_last)
    assert conv.weight.stride()[-1] == 32  # a 1x1 kernel: "contiguous", yet its last stride is not 1
    assert fingerprint(conv) == before


def test_a_run_without_preview_prompts_never_swaps_in_weights_to_draw_none(tiny_sd, shapes_dir, tmp_path, monkeypatch):
    from difftrain.methods.text2image import TextToImage

    calls = []  # (sample is called inside the swap: with EMA, a copy of every trained weight)
    monkeypatch.setattr(TextToImage, "sample", lambda *args: calls.append("drawn") or [])
    config = sd_config(tmp_path, shapes_dir, tiny_sd, sample={"every_steps": 1, "prompts": []},
                       training={"max_steps": 2, "ema": {"enabled": True}})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert "drawn" not in calls and not (tmp_path / "run" / "samples").exists()
