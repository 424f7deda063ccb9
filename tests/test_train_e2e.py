"""End to end through the CLI: train, resume, sample, load with diffusers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from launches import finish, forked_difftrain, stop_fork_server
from safetensors.torch import load_file

from difftrain.cli import main

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    """The killed, signalled and crashing runs fork from one server that imported the trainer once (launches.py);
    it ends with the module, its memory with it."""
    yield
    stop_fork_server()


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in CHECKPOINT_FILES:
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys(), name
        different = [k for k in left if not torch.equal(left[k], right[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    state_a, state_b = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert state_a == state_b


def test_train_writes_everything_a_user_looks_for(make_config, tmp_path, capsys):
    config = make_config(
        training={"max_steps": 4, "mixed_precision": "auto"},
        sample={"every_steps": 2},
        log={"every_steps": 1, "tensorboard": True},
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "run finished at step 4/4" in out and "final model" in out
    speed = next(line for line in out.splitlines() if line.strip().startswith("speed"))
    assert "steps/s" in speed and "images/s" in speed and "the steps alone" in speed
    assert "start-up" in out and "compile" not in out  # eager on a CPU: training.compile auto
    assert (run / "config.yaml").is_file() and (run / "data_report.txt").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert Image.open(run / "loss.png").size == (640, 360)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert list(run.rglob("events.out.tfevents*"))
    from difftrain.config import TrainingConfig
    from difftrain.training.optim import resolve_precision

    hparams = yaml.safe_load(next(run.rglob("hparams.yml")).read_text())  # accelerate's copy of TensorBoard's hparams
    assert hparams["training.mixed_precision"] == "auto" and hparams["ran.compile"] is False
    assert hparams["ran.mixed_precision"] == resolve_precision(TrainingConfig(mixed_precision="auto"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 for m in metrics)


def test_final_model_loads_in_diffusers_with_ema_weights(make_config, tmp_path):
    from diffusers import DDPMPipeline

    config = make_config(training={"max_steps": 3})
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    pipeline = DDPMPipeline.from_pretrained(run / "model")
    ema = load_file(str(run / "checkpoints" / "step-00000003" / "ema.safetensors"))
    raw = load_file(str(run / "checkpoints" / "step-00000003" / "model.safetensors"))
    name = "conv_in.weight"
    assert torch.equal(pipeline.unet.state_dict()[name], ema[f"unet.{name}"])
    assert not torch.equal(ema[f"unet.{name}"], raw[f"unet.{name}"])
    no_ema = DDPMPipeline.from_pretrained(run / "model-no-ema")
    assert torch.equal(no_ema.unet.state_dict()[name], raw[f"unet.{name}"])
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("num_workers, accumulation", [(0, 1), (2, 2)])
def test_resume_is_bitwise_identical(make_config, tmp_path, num_workers, accumulation):
    data = {"num_workers": num_workers, "crop": "random"}
    training = {"gradient_accumulation_steps": accumulation}
    straight = make_config("straight", data=data, training={**training, "max_steps": 6}, checkpoint={"every_steps": 3})
    assert main(["train", str(straight), "--no-progress"]) == 0
    halves = make_config("halves", data=data, training={**training, "max_steps": 3}, checkpoint={"every_steps": 3})
    assert main(["train", str(halves), "--no-progress"]) == 0
    assert main(["train", str(halves), "--no-progress", "--set", "training.max_steps=6", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000006", tmp_path / "halves/checkpoints/step-00000006")


def test_a_config_written_in_the_run_folder_keeps_its_comments_until_a_setting_changes(make_config, tmp_path):
    """Writing the config into its own output_dir is common (and the file users resume with): difftrain rewrote it
    with every default spelled out, the user's comments gone, even when nothing differed."""
    from difftrain.config import load_config

    own = tmp_path / "run" / "config.yaml"
    own.parent.mkdir()
    own.write_text("# my notes on this run\n" + make_config(training={"max_steps": 1}).read_text())
    written = own.read_text()
    assert main(["train", str(own), "--no-progress"]) == 0
    assert own.read_text() == written
    assert main(["train", str(own), "--no-progress", "--resume", "latest", "--set", "training.max_steps=2"]) == 0
    assert "# my notes" not in own.read_text() and load_config(own).training.max_steps == 2  # what the run used


def test_images_that_break_during_a_run_are_replaced_counted_and_listed_in_the_data_report(shapes_dir, tmp_path,
                                                                                          capsys):
    """A long run never dies on one bad record, and what it replaced was said only in a log line: the data
    report lists it, beside what was skipped at the start."""
    from conftest import tiny_config, write_config

    from difftrain.config import load_config
    from difftrain.training.trainer import Trainer

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    config = write_config(tmp_path / "run.yaml", tiny_config(data, tmp_path / "run", training={"max_steps": 3}))
    trainer = Trainer(load_config(config), progress=False)  # the folder is indexed: every image reads
    broken = sorted(data.glob("*.png"))[:3]
    for path in broken:
        path.write_bytes(path.read_bytes()[:60])  # cut short after indexing, as a disk or a sync can
    trainer.run()
    out = capsys.readouterr().out
    replaced = int(re.search(r"(\d+) replaced at read time \(this process\) \(see ", out)[1])
    report = (tmp_path / "run" / "data_report.txt").read_text()
    assert replaced >= 1 and f"{replaced} record(s) unreadable at read time in steps up to 3" in report
    listed = report.split("each replaced by another record (this process):\n")[1].splitlines()
    assert len(listed) == replaced and all(any(p.name in line for p in broken) for line in listed), report


def test_compiled_training_resumes_bitwise_and_refuses_to_mix_with_eager(make_config, tmp_path, capsys):
    """training.compile: true runs the UNet through inductor; a compiled run resumes exactly, and an
    eager run does not continue a compiled one (their kernels round differently)."""
    # One level and no attention: this test takes 51 s with a cold kernel cache (CI's clean machine), not 86.
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({"block_out_channels": [16], "down_block_types": ["DownBlock2D"],
                                "up_block_types": ["UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
                                "add_attention": False}))
    sections = {"training": {"compile": True, "max_steps": 4}, "checkpoint": {"every_steps": 2},
                "sample": {"every_steps": 2}, "model": {"unet_config": str(unet)}}
    straight = make_config("straight", **sections)
    assert main(["train", str(straight), "--no-progress"]) == 0
    out = capsys.readouterr().out
    compiling = re.search(r"torch.compile \(unet whole\): first step ([0-9.]+) s, about ([0-9]+) s of it compiling", out)
    assert compiling and float(compiling[2]) >= 1, out  # inductor really ran: an eager first step takes milliseconds
    state = json.loads((tmp_path / "straight/checkpoints/step-00000004/state.json").read_text())
    assert state["compiled"] is True
    assert len(list((tmp_path / "straight/samples").glob("*.png"))) == 2  # sampling runs eager beside the compiled step
    # The straight run's step-2 checkpoint in a folder of its own stands for a run stopped there (a third compiled
    # run saved: each builds its graphs again, from the kernel cache).
    halves = make_config("halves", **sections)
    shutil.copytree(tmp_path / "straight/checkpoints/step-00000002", tmp_path / "halves/checkpoints/step-00000002")
    assert main(["train", str(halves), "--resume", "latest", "--set", "training.compile=false"]) == 2
    assert "training.compile: checkpoint has True, this config has False" in capsys.readouterr().err
    assert main(["train", str(halves), "--no-progress", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000004",
                           tmp_path / "halves/checkpoints/step-00000004")


def test_resume_after_kill_is_bitwise_identical(make_config, tmp_path):
    """Kill -9 a run mid-training; resuming its checkpoint gives the same weights as never stopping.

    The killed run also draws a preview every step (slowing it enough to be killed mid-run):
    previews use their own generator, so they must not change what training computes.
    """
    training = {"max_steps": 8, "lr_scheduler": "cosine"}
    straight = make_config("straight", training=training, checkpoint={"every_steps": 4})
    assert main(["train", str(straight), "--no-progress"]) == 0

    killed = make_config("killed", training=training, checkpoint={"every_steps": 4}, sample={"every_steps": 1, "steps": 60})
    process = forked_difftrain("train", str(killed), "--no-progress")
    checkpoint = tmp_path / "killed/checkpoints/step-00000004"
    deadline = time.time() + 120
    while not (checkpoint / "state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (checkpoint / "state.json").exists(), "the run never reached its first checkpoint"

    assert not (tmp_path / "killed/checkpoints/step-00000008").exists(), "the run finished before it was killed"
    assert main(["train", str(killed), "--no-progress", "--resume", str(checkpoint)]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000008", tmp_path / "killed/checkpoints/step-00000008")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_checkpoints_at_a_step_boundary_and_resumes_exactly(make_config, tmp_path, how):
    """Ctrl-C as a terminal sends it, to the whole process group, data workers included; SIGTERM as a scheduler
    preempting the job sends it (SLURM: to every process of the job, data workers included)."""
    straight = make_config("straight", training={"max_steps": 8}, checkpoint={"every_steps": 100})
    assert main(["train", str(straight), "--no-progress"]) == 0

    stopped = make_config("stopped", training={"max_steps": 8}, checkpoint={"every_steps": 2},
                          sample={"every_steps": 1, "steps": 60}, data={"num_workers": 2})
    process = forked_difftrain("train", str(stopped), "--no-progress", new_session=True)
    first = tmp_path / "stopped/checkpoints/step-00000002/state.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "checkpoint saved at step" in output
    latest = sorted((tmp_path / "stopped/checkpoints").iterdir())[-1]
    saved = json.loads((latest / "state.json").read_text())
    assert 2 <= saved["step"] < 8

    assert main(["train", str(stopped), "--no-progress", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000008", tmp_path / "stopped/checkpoints/step-00000008")


def test_a_signal_while_previews_draw_leaves_them_off_for_the_checkpoint(make_config, tmp_path, monkeypatch, capsys):
    """The stop is read once a step, before previews: a signal that comes while they draw (minutes of an SD
    preview or a FID evaluation, past a scheduler's grace) ends them at the model's next forward, and the
    checkpoint comes at the end of the next step."""
    from difftrain.methods.unconditional import Unconditional

    sample = Unconditional.sample

    def signalled_while_drawing(self, *args, **kwargs):
        if not (tmp_path / "run/samples/step-00000001.png").exists():
            return sample(self, *args, **kwargs)  # the first step's previews draw as usual
        os.kill(os.getpid(), signal.SIGTERM)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(Unconditional, "sample", signalled_while_drawing)
    config = make_config(training={"max_steps": 8}, checkpoint={"every_steps": 100}, sample={"every_steps": 1})
    assert main(["train", str(config), "--no-progress"]) == 130
    assert "previews at step 2 left off: a stop signal came" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run/samples").glob("step-*.png")) == ["step-00000001.png"]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step-*")) == ["step-00000003"]


def test_a_signal_during_the_last_step_lets_the_run_finish(make_config, tmp_path, monkeypatch, capsys):
    from signal_probe import signalling_step_done

    from difftrain.training import trainer

    monkeypatch.setattr(trainer._LoopTimer, "step_done", signalling_step_done(2))
    assert main(["train", str(make_config(training={"max_steps": 2}, sample={"every_steps": 1})),
                 "--no-progress"]) == 0
    assert "SIGTERM: finishing this step" in capsys.readouterr().out
    assert (tmp_path / "run/model/model_index.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    # The last step's preview is left out too: the checkpoint and the model first, within the grace.
    assert sorted(p.name for p in (tmp_path / "run/samples").glob("step-*.png")) == ["step-00000001.png"]


def test_previews_that_fail_cost_neither_the_checkpoint_nor_the_run(make_config, tmp_path, monkeypatch, capsys):
    """A GPU out of memory while drawing a preview (or evaluating) lost the step's checkpoint and ended the run."""
    from difftrain.methods.unconditional import Unconditional

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(the rest of torch's message)")

    monkeypatch.setattr(Unconditional, "sample", out_of_memory)
    config = make_config(training={"max_steps": 4}, checkpoint={"every_steps": 2}, sample={"every_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "previews at step 2 failed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB); training " \
           "goes on" in out
    assert (tmp_path / "run/checkpoints/step-00000002/state.json").exists()
    assert (tmp_path / "run/model/model_index.json").exists()


def test_a_signal_writes_the_checkpoint_before_any_sample_or_evaluation(make_config, tmp_path, monkeypatch, capsys):
    from signal_probe import signalling_step_done

    from difftrain.training import trainer

    monkeypatch.setattr(trainer._LoopTimer, "step_done", signalling_step_done(2))
    config = make_config(training={"max_steps": 4}, checkpoint={"every_steps": 100}, sample={"every_steps": 1})
    assert main(["train", str(config), "--no-progress"]) == 130
    assert "checkpoint saved at step 2" in capsys.readouterr().out
    # A scheduler's grace would not outlast the drawing: step 2's preview is left out, its checkpoint written.
    assert sorted(p.name for p in (tmp_path / "run/samples").glob("step-*.png")) == ["step-00000001.png"]
    assert (tmp_path / "run/checkpoints/step-00000002/state.json").exists()


def test_resume_refuses_a_config_that_changes_training(make_config, tmp_path, capsys):
    config = make_config(training={"max_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["train", str(config), "--resume", "latest", "--set", "training.batch_size=8", "--set",
                 "training.max_steps=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot resume" in err and "training.batch_size: checkpoint has 4, this config has 8" in err
    # A checkpoint written on a GPU holds a CUDA noise generator's state, which a CPU generator cannot take:
    # refused before anything loads, rather than failing after the weights did.
    state_file = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1] / "state.json"
    state = json.loads(state_file.read_text())
    assert state["device"] == "cpu"
    state_file.write_text(json.dumps({**state, "device": "cuda"}))
    assert main(["train", str(config), "--resume", "latest", "--set", "training.max_steps=4"]) == 2
    assert "written on a cuda device and this run is on cpu" in capsys.readouterr().err


def test_a_resume_may_lower_the_learning_rate_but_not_start_past_max_steps(make_config, tmp_path, capsys):
    """What a divergence message advises: lower the rate (or clip) and resume. Every group's rate and the
    schedule's base scale by the same factor, so warmup goes on where it was."""
    config = make_config(training={"max_steps": 2, "lr_warmup_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    first = json.loads((tmp_path / "run/checkpoints/step-00000002/state.json").read_text())["lr_schedule"]
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress", "--resume", "latest", "--set", "training.max_steps=4",
                 "--set", "training.learning_rate=0.0005", "--set", "training.max_grad_norm=0.5"]) == 0
    assert "training.learning_rate 0.001 -> 0.0005: rates x0.5" in capsys.readouterr().out
    later = json.loads((tmp_path / "run/checkpoints/step-00000004/state.json").read_text())["lr_schedule"]
    assert later["base_lrs"] == [rate * 0.5 for rate in first["base_lrs"]] and later["last_epoch"] == 4
    assert main(["train", str(config), "--no-progress", "--resume", "latest", "--set", "training.max_steps=3",
                 "--set", "training.learning_rate=0.0005"]) == 2
    assert "it is at step 4, past training.max_steps = 3" in capsys.readouterr().err
    # Refused before any model loads, and before config.yaml, the file users resume with, takes its settings.
    assert "max_steps: 4" in (tmp_path / "run" / "config.yaml").read_text()


def test_the_process_group_waits_as_long_as_the_config_says(make_config):
    """accelerate passes the handler's timeout to init_process_group (to_kwargs keeps what differs from its
    default, NCCL's 10 minutes); a resume may change it."""
    from datetime import timedelta

    from difftrain.config import RESUME_SAFE_KEYS, load_config
    from difftrain.training.trainer import Trainer

    for sections, minutes in (({}, 30), ({"training": {"process_timeout_minutes": 90}}, 90)):
        trainer = Trainer(load_config(make_config(**sections)), progress=False)
        assert trainer.accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=minutes)}
    assert "training.process_timeout_minutes" in RESUME_SAFE_KEYS


def test_mixed_precision_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    from difftrain.config import TrainingConfig
    from difftrain.training.optim import resolve_precision

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    auto = TrainingConfig(mixed_precision="auto")
    assert resolve_precision(TrainingConfig(mixed_precision="bf16")) == "bf16"
    assert resolve_precision(TrainingConfig()) == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert resolve_precision(auto) == expected, (avx512_bf16, amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # DeepSpeed casts by itself: accelerate stays fp32
    assert resolve_precision(auto) == "no"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # A T4 or V100 emulates bf16: torch says supported unless asked about native support.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision(auto) == "no"
    assert resolve_precision(auto, recorded="bf16") == "bf16"  # a resumed run keeps its checkpoint's precision


def test_a_resumed_auto_run_keeps_the_precision_its_checkpoint_trained_in(make_config, capsys):
    config = make_config(training={"max_steps": 2})  # fp32, as every run before `auto` existed
    assert main(["train", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    checkpoint = config.parent / "run" / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "state.json").read_text())["mixed_precision"] == "no"
    # Whatever auto means on this machine, the run goes on as it started; no config conflict.
    assert main(["train", str(config), "--no-progress", "--resume", "latest", "--set", "training.max_steps=3",
                 "--set", "training.mixed_precision=auto"]) == 0
    assert "  precision   fp32 (mixed_precision: auto)\n" in capsys.readouterr().out


def test_a_resumed_auto_run_compiles_as_its_checkpoint_did_before_its_first_step(make_config, capsys):
    """`auto` follows the checkpoint's recorded choice when the modules are compiled (or not), at
    construction: deciding after the checkpoint loaded left the modules as the new config's rule made them."""
    from difftrain.config import load_config
    from difftrain.training.trainer import Trainer

    config = make_config(training={"max_steps": 2})  # the pixel UNet: `auto` is eager on a CPU
    assert main(["train", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    state_file = config.parent / "run" / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["compiled"] is False
    state_file.write_text(json.dumps({**state, "compiled": True}))  # as a run whose `auto` compiled writes it
    trainer = Trainer(load_config(config), resume="latest", progress=False)
    assert trainer.compiled is True
    assert trainer.wrapped["unet"]._compiled_call_impl is not None  # compiled before any step, not only said to be
    assert trainer.compiled_parts == ["unet whole"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's rule")
def test_compile_auto_on_a_cpu_is_long_bf16_sd_unet_runs_only_and_a_resumed_auto_run_keeps_its_checkpoints_choice(
        monkeypatch):
    from difftrain.config import parse_config
    from difftrain.training.optim import CPU_COMPILE_MIN_STEPS, resolve_compile

    def config(method="text2image", steps=CPU_COMPILE_MIN_STEPS, compile="auto", **sections):
        latent = {"model": {"base": "sd"}} if method != "unconditional" else {}
        return parse_config({"method": method, "data": {"path": "d"}, **latent,
                             "training": {"compile": compile, "max_steps": steps}, **sections})

    long_sd = config()
    assert resolve_compile(long_sd, "bf16") is True  # 46-92 ms a step: pays a cold compile (optim.py)
    dreambooth = config(method="dreambooth",
                        dreambooth={"instance_prompt": "a photo of sks dog", "prior_preservation": False})
    assert resolve_compile(dreambooth, "bf16") is True  # the same UNet, trained whole
    # Eager wherever inductor did not pay or was not measured to: fp32, the demo's pixel UNet, LoRA, a text
    # encoder trained beside the UNet, a ControlNet, buckets, and runs too short to earn the compile back.
    assert resolve_compile(long_sd, "no") is False
    assert resolve_compile(config(method="unconditional"), "bf16") is False
    assert resolve_compile(config(lora={"enabled": True}), "bf16") is False
    assert resolve_compile(config(text2image={"train_text_encoder": True}), "bf16") is False
    assert resolve_compile(config(method="controlnet"), "bf16") is False
    bucketed = config(data={"path": "d", "resolution": 128, "buckets": {"enabled": True}})
    assert resolve_compile(bucketed, "bf16") is False  # every bucket's shape would compile again
    assert resolve_compile(config(steps=CPU_COMPILE_MIN_STEPS - 1), "bf16") is False
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")  # no C++ compiler for inductor's CPU code: eager rather than fail at step 1
    assert resolve_compile(long_sd, "bf16") is False
    monkeypatch.undo()
    # A resumed auto run does what its checkpoint recorded, so resume is exact; an explicit setting is obeyed.
    assert resolve_compile(long_sd, "bf16", recorded=False) is False
    assert resolve_compile(config(steps=10), "no", recorded=True) is True
    assert resolve_compile(config(steps=10, compile=True), "no") is True
    assert resolve_compile(config(compile="false"), "bf16") is False


def test_resume_refuses_a_changed_data_set(make_config, tmp_path, shapes_dir, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    config = make_config(data={"path": str(data)}, training={"max_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    # Same number of images, one of them different: a count check would not see it.
    shutil.copyfile(data / "000004.png", data / "000003.png")
    os.utime(data / "000003.png", ns=(1, 1))
    capsys.readouterr()
    assert main(["train", str(config), "--resume", "latest", "--set", "training.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "not the one it was trained on" in err and "1 changed size or time (e.g. 000003.png)" in err
    (data / "000005.png").unlink()
    assert main(["train", str(config), "--resume", "latest", "--set", "training.max_steps=4"]) == 2
    assert "1 removed (e.g. 000005.png)" in capsys.readouterr().err
    assert main(["train", str(config), "--no-progress", "--resume", "latest", "--set", "training.max_steps=4",
                 "--allow-data-change"]) == 0
    assert (tmp_path / "run/checkpoints/step-00000004/state.json").is_file()


def test_resuming_an_earlier_checkpoint_moves_the_abandoned_branch_aside(make_config, tmp_path, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    config = make_config(training={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000004", "step-00000006"]
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress", "--resume", str(checkpoints / "step-00000004"),
                 "--set", "training.max_steps=8", "--set", "checkpoint.keep_last=1"]) == 0
    assert "step-00000006" in capsys.readouterr().out  # the one-line notice names what moved
    # keep_last=1 keeps the new branch's newest, not the abandoned step 6 (the old rule deleted step 8 at once).
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000008"]
    abandoned = checkpoints / "abandoned" / "step-00000006"
    assert (abandoned / "state.json").is_file()
    state = json.loads((checkpoints / "step-00000008" / "state.json").read_text())
    assert state["step"] == 8
    # The curves are the new branch's: its steps 5-8 logged once, the abandoned branch's 5-6 dropped at the resume.
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    # Back to the abandoned branch: every checkpoint of the run is now the branch left behind, not "later" ones
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress", "--resume", str(abandoned), "--set",
                 "training.max_steps=6"]) == 0
    assert ("the run's checkpoints of the branch left behind moved to "
            f"{checkpoints / 'abandoned'} (as step-00000008)") in capsys.readouterr().out


def test_a_fresh_run_into_a_folder_whose_run_trained_and_saved_nothing_is_refused(make_config, tmp_path, capsys):
    config = make_config(training={"max_steps": 2}, checkpoint={"every_steps": 100})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 16.0, "lr": 0.5}\n')  # a diverged run's
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "holds a run that trained and wrote no checkpoint (its metrics.jsonl)" in capsys.readouterr().err
    # A folder of the user's own under the name a run writes its model to, replaced whole at the end: refused
    (tmp_path / "run" / "metrics.jsonl").unlink()
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "run" / "model" / "my-weights.safetensors").write_bytes(b"mine")
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "model holds files that are no difftrain model (no difftrain.json)" in capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "my-weights.safetensors").read_bytes() == b"mine"


CRASH_AFTER_REPLACE = """
import os
from pathlib import Path
import difftrain.atomic as atomic
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if Path(src).name == target or Path(dst).as_posix().endswith(target):
        os._exit(9)  # as abrupt as kill -9: no cleanup, no flush of Python state
atomic.os.replace = replace
"""


def crash_after_replace(target: str, *args: str) -> None:
    crashing = forked_difftrain(*args, "--no-progress", prelude=CRASH_AFTER_REPLACE, target=target)
    output, _ = finish(crashing)
    assert crashing.returncode == 9, output[-2000:]


def test_a_crash_during_a_checkpoint_save_or_the_final_model_write_loses_nothing(make_config, tmp_path):
    from diffusers import UNet2DModel

    training = {"max_steps": 8}
    straight = make_config("straight", training=training, checkpoint={"every_steps": 4})
    assert main(["train", str(straight), "--no-progress"]) == 0

    crashed = make_config("crashed", training=training, checkpoint={"every_steps": 4})
    run = tmp_path / "crashed"
    # 1. Killed inside the step-8 save, with half its files in the staging folder.
    crash_after_replace("tmp-step-00000008/optimizer.safetensors", "train", str(crashed))
    assert not (run / "checkpoints/step-00000008").exists() and (run / "checkpoints/.tmp-step-00000008").exists()
    assert main(["train", str(crashed), "--no-progress", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000008", run / "checkpoints/step-00000008")

    # 2. Killed while a re-written final model is swapped in: the old one is moved aside, the new one not yet in.
    crash_after_replace("model", "train", str(crashed), "--resume", "latest")
    assert not (run / "model").exists() and (run / ".model.old").is_dir()
    assert main(["train", str(crashed), "--no-progress", "--resume", "latest"]) == 0
    assert not (run / ".model.old").exists() and not list(run.glob(".*.staging"))
    mine = UNet2DModel.from_pretrained(run / "model" / "unet").state_dict()
    theirs = UNet2DModel.from_pretrained(tmp_path / "straight" / "model" / "unet").state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_written_files_follow_the_umask(make_config, tmp_path):
    old = os.umask(0o022)
    try:
        config = make_config(training={"max_steps": 2})
        assert main(["train", str(config), "--no-progress"]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*.safetensors")]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o777 != 0o644]


def test_bf16_mixed_precision_on_cpu_and_fp16_refused(make_config, capsys):
    config = make_config(training={"max_steps": 2, "mixed_precision": "bf16", "gradient_accumulation_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "final loss" in out and "  precision   bf16 autocast, trained weights fp32\n" in out
    if not torch.cuda.is_available():
        assert main(["train", str(config), "--set", "training.mixed_precision=fp16"]) == 2
        assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_resume_latest_without_checkpoint_is_a_clear_error(make_config, capsys):
    config = make_config(training={"max_steps": 2})
    assert main(["train", str(config), "--resume", "latest"]) == 2
    assert "no checkpoint under" in capsys.readouterr().err
    assert main(["train", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(config)]) == 2  # a finished run is not silently overwritten
    assert "already holds a run (checkpoint step-00000002); add --resume latest" in capsys.readouterr().err
    # Resumed when finished: no step runs; the summary gives the log's last loss (it said "final loss  -")
    assert main(["train", str(config), "--resume", "latest", "--no-progress"]) == 0
    assert re.search(r"  final loss  \d+\.\d{4}\n", capsys.readouterr().out)


def test_bad_files_are_skipped_counted_and_listed(shapes_dir, tmp_path, capsys):
    import shutil

    from conftest import tiny_config, write_config

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "000000.png").write_bytes(b"")
    noisy = tmp_path / "noisy.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(noisy)
    (data / "000001.png").write_bytes(noisy.read_bytes()[:2000])  # a download cut short
    (data / "000002.txt").write_bytes("café".encode("latin-1"))  # a caption problem: its image is still used
    config = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run", training={"max_steps": 1},
                                                         data={"path": str(data), "resolution": 16, "captions": "txt"}))
    assert main(["train", str(config), "--no-progress"]) == 0
    assert "22 records, 2 skipped at start, 0 replaced at read time (this process), 1 caption problems" in (
        capsys.readouterr().out)
    report = (tmp_path / "run" / "data_report.txt").read_text()
    assert "000000.png: empty file" in report and "000001.png: cannot decode" in report
    assert "1 caption problems (no image left out for them):\n  000002.txt: not valid UTF-8" in report


def test_unusable_dataset_fails_before_training(tmp_path, capsys):
    from conftest import tiny_config, write_config

    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "empty", tmp_path / "run"))
    assert main(["train", str(config)]) == 2
    assert "no usable images" in capsys.readouterr().err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_command_on_run_and_diffusers_folders(make_config, tmp_path, prediction_type, capsys):
    config = make_config(training={"max_steps": 2}, noise={"prediction_type": prediction_type, "beta_schedule": "cosine"})
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    for source in (run, run / "model"):
        out = tmp_path / f"grid-{source.name}.png"
        assert main(["sample", str(source), "--num", "4", "--scheduler", "euler", "--steps", "3", "--seed", "1", "--out", str(out)]) == 0
        assert Image.open(out).size == (2 * 128 + 6, 2 * 128 + 6)  # 2x2 grid, 16px upscaled 8x, 2px gutters
    sheet = tmp_path / "sheet.png"
    assert main(["sample", str(run), "--scheduler", "all", "--num", "2", "--steps", "3", "--out", str(sheet)]) == 0
    assert Image.open(sheet).height == 8 * (64 + 4)  # one row per sampler, 16 px images drawn at 64 px
    saved = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == prediction_type and saved["beta_schedule"] == "squaredcos_cap_v2"
    assert main(["sample", str(run), "--scheduler", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err
    if prediction_type == "epsilon":
        from difftrain.generate.unconditional import scheduler_sheet

        file = run / "model" / "scheduler" / "scheduler_config.json"
        file.write_text(json.dumps({**saved, "prediction_type": "sample"}))
        # a model that predicts the sample: the rows of the samplers that can draw it (it refused the whole sheet)
        sheet, drawn = scheduler_sheet(run / "model", num_images=1, steps=2)
        assert sheet.height == 7 * (64 + 4) and "euler_a" not in drawn and len(drawn) == 7  # all but euler_a
        capsys.readouterr()  # and the command names what it drew (it listed all eight)
        assert main(["sample", str(run / "model"), "--scheduler", "all", "--num", "1", "--steps", "2", "--out",
                     str(tmp_path / "sheet-sample.png")]) == 0
        said = capsys.readouterr().out
        assert "euler, heun" in said and "; not euler_a, which cannot sample this model's prediction type" in said


def test_same_seed_same_grid_and_checkpoint_fallback(make_config, tmp_path):
    from difftrain.generate.unconditional import sample_grid

    config = make_config(training={"max_steps": 2})
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    _, first = sample_grid(run, num_images=2, scheduler="ddim", steps=3, seed=5)
    _, again = sample_grid(run, num_images=2, scheduler="ddim", steps=3, seed=5)
    assert [i.tobytes() for i in first] == [i.tobytes() for i in again]
    import shutil

    shutil.rmtree(run / "model")  # as if the run were still going: sample its latest checkpoint
    _, from_checkpoint = sample_grid(run, num_images=2, scheduler="ddim", steps=3, seed=5)
    assert [i.tobytes() for i in from_checkpoint] == [i.tobytes() for i in first]


def test_a_diverged_loss_stops_the_run_before_a_checkpoint_holds_it(make_config, tmp_path, capsys, monkeypatch):
    from difftrain.methods.unconditional import Unconditional

    original, calls = Unconditional.loss, []

    def diverging(self, modules, batch, generator):  # the third step's forward overflows
        calls.append(1)
        loss = original(self, modules, batch, generator)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(Unconditional, "loss", diverging)
    config = make_config(training={"max_steps": 8}, checkpoint={"every_steps": 2}, log={"every_steps": 5})
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the loss became nan by step 4" in err and "step-00000002, is from before it" in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-00000002"]


def test_each_process_draws_noise_from_a_stream_apart_from_its_global_one():
    """seed + rank seeds the global generator (dropout masks); the noise generator's seed must not repeat it
    (the old seed * 7919 + rank did, at the default seed 0), nor another process's."""
    import torch

    from difftrain.training.trainer import noise_seed

    seeds = {(seed, rank): noise_seed(seed, rank) for seed in (0, 1, 42) for rank in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(value != seed + rank for (seed, rank), value in seeds.items())
    # the first draws differ from the global generator's of the same process
    assert not torch.equal(torch.randn(8, generator=torch.Generator().manual_seed(noise_seed(0, 1))),
                           torch.randn(8, generator=torch.Generator().manual_seed(0 + 1)))


def test_machines_agree_on_the_data_by_records_sizes_and_captions_not_file_times(tmp_path):
    import os

    from PIL import Image

    from difftrain.data.fingerprint import fingerprint_and_layout
    from difftrain.data.sources import open_source

    for name in ("a", "b"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name}")
    def layout():
        return fingerprint_and_layout(open_source("folder", tmp_path, progress=False))[1]

    before = layout()
    os.utime(tmp_path / "a.png", (1, 1))  # copied without -p: the same data
    assert layout() == before
    (tmp_path / "b.txt").write_text("another caption")
    assert layout() != before


def test_two_trainings_never_write_one_run_folder_at_once(make_config, tmp_path, capsys):
    import fcntl

    from difftrain.training.trainer import RUN_LOCK

    config = make_config(training={"max_steps": 2})
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / RUN_LOCK, "a") as held:  # as a first `difftrain train` of this run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["train", str(config), "--no-progress"]) == 2
        assert "another difftrain train is writing to" in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["train", str(config), "--no-progress"]) == 0  # once it has ended
    assert main(["train", str(config), "--resume", "latest", "--set", "training.max_steps=3", "--no-progress"]) == 0
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert main(["train", str(config), "--set", f"output_dir={tmp_path / 'file'}", "--no-progress"]) == 2
    assert "is a file; give a folder for the run" in capsys.readouterr().err
    data = tmp_path / "own-data"
    data.mkdir()
    assert main(["train", str(config), "--set", f"data.path={data}", "--set", f"output_dir={data / 'run'}",
                 "--no-progress"]) == 2
    assert "is inside data.path" in capsys.readouterr().err


def test_a_damaged_or_misnamed_checkpoint_is_refused_naming_it(make_config, tmp_path, capsys):
    import shutil

    config = make_config(training={"max_steps": 4, "ema": {"enabled": False}})
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    # (a checkpoint's manifest says which weights it holds and their step: it said ema, and the run's max_steps)
    manifest = json.loads((checkpoints / "step-00000002" / "difftrain.json").read_text())
    assert manifest["weights"] == "raw" and manifest["trained"]["at_step"] == 2
    shutil.copytree(checkpoints / "step-00000002", checkpoints / "step-00000002.bak")  # a user's backup copy
    capsys.readouterr()
    assert main(["train", str(config), "--resume", str(checkpoints / "step-00000002.bak"), "--no-progress"]) == 2
    assert "under another name than step-N" in capsys.readouterr().err
    written = checkpoints / "step-00000002" / "config.yaml"
    kept = written.read_text()
    for damage in ("x: [", ""):  # a config.yaml cut short: a traceback from the YAML parser, or no advice
        written.write_text(damage)
        assert main(["train", str(config), "--resume", str(written.parent), "--no-progress"]) == 2
        assert f"checkpoint file {written} is damaged" in capsys.readouterr().err
    written.write_text(kept)
    latest = checkpoints / "step-00000004"
    weights = next(latest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:50])  # an interrupted copy of the run folder
    resume = ["train", str(config), "--resume", "latest", "--set", "training.max_steps=6", "--no-progress"]
    assert main(resume) == 2
    assert f"checkpoint file {weights} is damaged" in capsys.readouterr().err
    (latest / "state.json").write_text('{"step": 4, "posit')
    assert main(resume) == 2
    assert f"checkpoint file {latest / 'state.json'} is damaged" in capsys.readouterr().err
