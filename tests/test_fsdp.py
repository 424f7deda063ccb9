"""FSDP through accelerate on two CPU processes (gloo): same training as DDP, half the state per process,
sharded checkpoints that resume bitwise and consolidate into the usual files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difftrain.cli import main
from test_text2image import losses, sd_config, tiny_sd  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
FSDP = ROOT / "configs" / "accelerate" / "fsdp_full_shard.yaml"


def _launch(config: Path, *extra: str, accelerate_config: Path | None = None) -> subprocess.Popen:
    how = ["--config_file", str(accelerate_config)] if accelerate_config else ["--multi_gpu", "--num_processes", "2"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", "0",
               "-m", "difftrain", "train", "--no-progress", str(config), *extra]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*processes: subprocess.Popen) -> list[str]:
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def _state_mib(output: str) -> float:
    return float(re.search(r"memory +([\d.]+) MiB of trained weights and optimizer state per process", output)[1])


def test_fsdp_trains_as_ddp_does_with_half_the_state_and_resumes_bitwise(tiny_sd, shapes_dir, tmp_path, capsys):  # noqa: F811
    sections = dict(training={"max_steps": 4, "ema": {"decay": 0.9}}, checkpoint={"every_steps": 2})
    ddp, fsdp = (sd_config(tmp_path, shapes_dir, tiny_sd, name, **sections) for name in ("ddp", "fsdp"))
    ddp_out, fsdp_out = _finish(_launch(ddp), _launch(fsdp, accelerate_config=FSDP))
    # The run as it stood at step 2, resumed from there in the background while the rest is checked.
    halves = sd_config(tmp_path, shapes_dir, tiny_sd, "halves", **sections)
    shutil.copytree(tmp_path / "fsdp/checkpoints/step-00000002", tmp_path / "halves/checkpoints/step-00000002")
    resumed = _launch(halves, "--resume", "latest", accelerate_config=FSDP)

    # The same loss curve; the weights and optimizer state of every process are half of DDP's.
    assert "FSDP: sharded over 2" in fsdp_out and "FSDP" not in ddp_out
    assert torch.allclose(torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "ddp")),
                          rtol=1e-4, atol=1e-6)
    ratio = _state_mib(fsdp_out) / _state_mib(ddp_out)
    assert 0.45 < ratio < 0.55, ratio

    # Written sharded: one part per process, never the whole optimizer in one file.
    step4 = tmp_path / "fsdp/checkpoints/step-00000004"
    assert sorted(p.name for p in step4.glob("*-rank*.safetensors")) == [
        f"{part}-rank{r}.safetensors" for part in ("ema", "model", "optimizer", "rng") for r in (0, 1)]
    assert not (step4 / "model.safetensors").exists()
    # Consolidated, it is DDP's checkpoint to float rounding (reduce-scatter sums in another order).
    # Where a gradient is rounding alone (a conv bias before a GroupNorm of one channel per group, an
    # attention key bias), Adam turns it into a step of up to lr: those elements may differ by 4 x lr.
    assert main(["checkpoint", "consolidate", str(step4), "--out", str(tmp_path / "joined")]) == 0
    for part in ("model", "ema", "optimizer"):
        joined = load_file(str(tmp_path / "joined" / f"{part}.safetensors"))
        reference = load_file(str(tmp_path / f"ddp/checkpoints/step-00000004/{part}.safetensors"))
        assert joined.keys() == reference.keys()
        differences = torch.cat([(joined[k].double() - reference[k].double()).abs().flatten() for k in reference])
        print(part, "largest difference", differences.max().item(), "share over 1e-6",
              (differences > 1e-6).double().mean().item())
        assert (differences > 1e-6).double().mean() < 0.01, part
        if part != "optimizer":  # Adam's second moments are squares of gradients: compared in share only
            assert differences.max() <= 4 * 1e-4, part
    # The final model rank 0 gathered holds exactly the EMA weights the processes held in parts.
    final = load_file(str(tmp_path / "fsdp/model/unet/diffusion_pytorch_model.safetensors"))
    ema = load_file(str(tmp_path / "joined/ema.safetensors"))
    assert all(torch.equal(final[key.removeprefix("unet.")], value) for key, value in ema.items())
    raw = load_file(str(tmp_path / "fsdp/model-no-ema/unet/diffusion_pytorch_model.safetensors"))
    joined_model = load_file(str(tmp_path / "joined/model.safetensors"))
    assert all(torch.equal(raw[key.removeprefix("unet.")], value) for key, value in joined_model.items())
    assert not all(torch.equal(raw[key.removeprefix("unet.")], value) for key, value in ema.items())
    assert (tmp_path / "joined/config.yaml").is_file()  # consolidated elsewhere, it keeps what sample reads

    # 2 steps + resume to 4 under FSDP equals 4 straight, bit for bit, in every process's parts.
    _finish(resumed)
    # Of the random states, the training noise's: torch's global generator is drawn once by each new data loader.
    for name in sorted(p.name for p in step4.glob("*-rank*.safetensors")):
        one, two = load_file(str(step4 / name)), load_file(str(tmp_path / "halves/checkpoints/step-00000004" / name))
        keys = ["noise"] if name.startswith("rng") else one.keys()
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in keys), name

    # An FSDP checkpoint does not resume as data parallel (its files are parts), and says so.
    assert main(["train", str(halves), "--set", "training.max_steps=6", "--resume", "latest"]) == 2
    assert "written by a FSDP run and this one is data parallel" in capsys.readouterr().err


def test_consolidate_refuses_a_whole_checkpoint_and_a_missing_part(tmp_path, capsys):
    (tmp_path / "step-2").mkdir()
    assert main(["checkpoint", "consolidate", str(tmp_path / "step-2")]) == 2
    assert "not a sharded checkpoint" in capsys.readouterr().err
    (tmp_path / "step-2" / "shards.json").write_text(json.dumps({"world_size": 2, "dim": 0, "sharded": {"model": []}}))
    shutil.copy(__file__, tmp_path / "step-2" / "model-rank0.safetensors")
    assert main(["checkpoint", "consolidate", str(tmp_path / "step-2")]) == 2
    assert "lacks model-rank1.safetensors" in capsys.readouterr().err


def test_fsdp_refuses_adapter_runs_on_every_rank_before_a_step(tiny_sd, shapes_dir, tmp_path, monkeypatch):  # noqa: F811
    from difftrain.config import parse_config
    from difftrain.training import sharding
    from difftrain.training.trainer import Trainer

    monkeypatch.setattr(sharding, "is_sharded", lambda accelerator: True)  # as under an FSDP launch
    config = sd_config(tmp_path, shapes_dir, tiny_sd, lora={"enabled": True, "rank": 2})
    with pytest.raises(sharding.ShardingError, match="a LoRA run trains a few MB .* configs/accelerate/ddp.yaml"):
        Trainer(parse_config(yaml.safe_load(config.read_text())), progress=False)


def test_a_deepspeed_launch_is_refused_before_anything_loads(make_config, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["train", str(make_config())]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed config, which difftrain does not train with yet" in err and "fsdp_shard_grad_op.yaml" in err


def test_rank_0_rebuilds_models_from_their_config_and_wrappers_from_their_children(tiny_sd):  # noqa: F811
    from diffusers import AutoencoderKL

    from difftrain.methods.vae import Autoencode
    from difftrain.training.sharding import ShardingError, _rebuilt

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    copy = _rebuilt(Autoencode(vae))
    assert type(copy) is Autoencode and type(copy.vae) is AutoencoderKL and copy.vae.config == vae.config
    assert copy.state_dict().keys() == Autoencode(vae).state_dict().keys()
    with pytest.raises(ShardingError, match="cannot rebuild an unsharded Linear"):
        _rebuilt(torch.nn.Linear(2, 2))
