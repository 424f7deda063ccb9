"""Training on two CPU processes (gloo), as accelerate launches it: DDP on one machine and on two "machines"
on loopback train the same bits; FSDP and DeepSpeed ZeRO-1/2/3 train what DDP trains with less state per
process, write checkpoints that stay safetensors, and resume exactly. One fixture launches every run, through
accelerate's launcher with its processes forked from one that has imported the trainer (launches.py)."""

from __future__ import annotations

import json
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difftrain.cli import main
from launches import ForkedLaunch, finish, forked_accelerate_launch, stop_fork_server
from test_text2image import losses, sd_config, tiny_sd  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
FSDP = ROOT / "configs" / "accelerate" / "fsdp_full_shard.yaml"
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
ZERO3 = ROOT / "configs" / "accelerate" / "deepspeed_zero3_offload.yaml"


def _launch(config: Path, *extra: str, accelerate_config: Path | None = None,
            how: tuple[str, ...] = ("--multi_gpu", "--num_processes", "2", "--main_process_port", "0")
            ) -> ForkedLaunch:
    if accelerate_config:
        how = ("--config_file", str(accelerate_config), "--main_process_port", "0")
    return forked_accelerate_launch(*how, "-m", "difftrain", "train", "--no-progress", str(config), *extra)


def _finish(*processes: ForkedLaunch) -> list[str]:
    outputs = [finish(p)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def _state_mib(output: str) -> float:
    return float(re.search(r"memory +([\d.]+) MiB of trained weights and optimizer state per process", output)[1])

@pytest.fixture(scope="module")
def runs(tiny_sd, shapes_dir, tmp_path_factory) -> SimpleNamespace:  # noqa: F811
    """tiny SD text2image with EMA, 2 processes a run: 4 steps under DDP and FSDP, and FSDP's step-2
    checkpoint resumed to step 4 in a second folder; ZeRO-2 and ZeRO-3 (CPU offload) train 2 steps and
    resume to 4 in their own folder; two one-process "machines" on loopback train 2 steps; DDP with
    training.optimizer: muon trains 4 steps, and in a second folder is stopped at 3 by a signal to one process
    and resumed to 4. Each engine's
    runs follow one another and the engines run side by side, which keeps both cores busy to the end.
    max_grad_norm 0.05 is below this model's early gradient norms, so every engine's clipping takes part."""
    tmp = tmp_path_factory.mktemp("parallel")
    sections = dict(training={"max_steps": 4, "ema": {"decay": 0.9}, "max_grad_norm": 0.05, "batch_size": 2,
                              "gradient_accumulation_steps": 2}, checkpoint={"every_steps": 2})
    config = lambda name: sd_config(tmp, shapes_dir, tiny_sd, name, **sections)  # noqa: E731
    halfway, resume = ("--set", "training.max_steps=2"), ("--resume", "latest")
    resumed = {"fsdp": config("fsdp-halves"), "zero2": config("zero2"), "zero3": config("zero3")}

    def fsdp() -> str:
        output = _finish(_launch(config("fsdp"), accelerate_config=FSDP))[0]
        shutil.copytree(tmp / "fsdp/checkpoints/step-00000002", tmp / "fsdp-halves/checkpoints/step-00000002")
        _finish(_launch(resumed["fsdp"], *resume, accelerate_config=FSDP))
        return output

    def zero(stage: int, launcher: Path) -> str:
        _finish(_launch(resumed[f"zero{stage}"], *halfway, accelerate_config=launcher))
        return _finish(_launch(resumed[f"zero{stage}"], *resume, accelerate_config=launcher))[0]  # the 4-step summary

    def machines() -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        # On a CPU --multi_gpu is still needed: it makes accelerate start torchrun's static rendezvous at
        # --main_process_ip:port instead of one plain process per command.
        how = ("--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--machine_rank")
        return _finish(*(_launch(config("two-machines"), *halfway, how=(*how, str(rank))) for rank in (0, 1)))[0]

    def ddp() -> str:
        output = _finish(_launch(config("ddp")))[0]
        # Then resumed with rank 1 seeing none of its checkpoints, as on a machine that does not share the folder.
        probe = Path(__file__).with_name("unshared_folder_probe.py")
        unshared = forked_accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                                            str(probe), "train", "--no-progress", str(tmp / "ddp.yaml"),
                                            "--set", "training.max_steps=6", "--resume", "latest")
        output_unshared = finish(unshared)[0]  # a process left waiting at a collective would hang here
        (tmp / "unshared.out").write_text(f"exit {unshared.returncode}\n{output_unshared}")
        # And from a checkpoint without rank 1's part: every process stops before any loads (rank 0 went on alone,
        # rewrote config.yaml, and died at the next collective with a gloo traceback).
        shutil.copytree(tmp / "ddp", tmp / "partless", ignore=shutil.ignore_patterns("model", "model-no-ema"))
        (tmp / "partless/checkpoints/step-00000004/rng-rank1.safetensors").unlink()
        partless = _launch(tmp / "ddp.yaml", "--set", f"output_dir={tmp / 'partless'}", "--set",
                           "training.learning_rate=0.0005", "--set", "training.max_steps=6", *resume)
        output_partless = finish(partless)[0]
        (tmp / "partless.out").write_text(f"exit {partless.returncode}\n{output_partless}")
        # And evaluation that only rank 0 can find wanting (its Inception file is missing): every process stops.
        uneval = _launch(tmp / "ddp.yaml", "--set", f"output_dir={tmp / 'uneval'}", "--set", "eval.every_steps=2",
                         "--set", "eval.metrics=[fid]", "--set", f"eval.inception_weights={tmp / 'none.safetensors'}")
        output_uneval = finish(uneval)[0]
        (tmp / "uneval.out").write_text(f"exit {uneval.returncode}\n{output_uneval}")
        return output

    def muon() -> str:  # DDP with training.optimizer: muon, straight, and stopped by a signal at step 3 and resumed
        muon_sections = dict(sections, training={**sections["training"], "optimizer": "muon"})
        output = _finish(_launch(sd_config(tmp, shapes_dir, tiny_sd, "muon", **muon_sections)))[0]
        halves = sd_config(tmp, shapes_dir, tiny_sd, "muon-halves", **muon_sections)
        probe = Path(__file__).with_name("signal_probe.py")
        signalled = forked_accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                                             str(probe), "train", "--no-progress", str(halves))
        output_signalled = finish(signalled)[0]
        checkpoints = sorted(p.name for p in (tmp / "muon-halves/checkpoints").glob("step-*"))
        (tmp / "signalled.out").write_text(f"exit {signalled.returncode}\n{' '.join(checkpoints)}\n{output_signalled}")
        _finish(_launch(halves, *resume))
        return output

    chains = {"ddp": ddp, "fsdp": fsdp, "zero2": lambda: zero(2, ZERO2),
              "zero3": lambda: zero(3, ZERO3), "two-machines": machines, "muon": muon}
    try:
        with ThreadPoolExecutor(len(chains)) as pool:
            futures = {name: pool.submit(chain) for name, chain in chains.items()}
            outputs = {name: future.result() for name, future in futures.items()}
    finally:
        stop_fork_server()
    return SimpleNamespace(root=tmp, outputs=outputs, resumed=resumed, ddp=tmp / "ddp.yaml")


def _assert_same_tensors(one_run: Path, other: Path, names: list[str], every_rng: bool = False) -> None:
    """Two checkpoints' files hold the same tensors, bit for bit. Of the random states of a resumed run, the
    training noise's: torch's global generator is drawn once by each new data loader."""
    for name in names:
        one, two = load_file(str(one_run / name)), load_file(str(other / name))
        keys = ["noise"] if name.startswith("rng") and not every_rng else one.keys()
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in keys), name


def test_fsdp_trains_as_ddp_does_with_half_the_state_and_resumes_bitwise(runs, capsys):
    root = runs.root
    # The same loss curve; the weights and optimizer state of every process are half of DDP's.
    fsdp_out, ddp_out = runs.outputs["fsdp"], runs.outputs["ddp"]
    assert "FSDP: weights and optimizer split over 2" in fsdp_out and "FSDP" not in ddp_out
    assert torch.allclose(torch.tensor(losses(root / "fsdp")), torch.tensor(losses(root / "ddp")), rtol=1e-4, atol=1e-6)
    ratio = _state_mib(fsdp_out) / _state_mib(ddp_out)
    assert 0.45 < ratio < 0.55, ratio

    # Written sharded: one part per process, never the whole optimizer in one file.
    step4 = root / "fsdp/checkpoints/step-00000004"
    assert sorted(p.name for p in step4.glob("*-rank*.safetensors")) == [
        f"{part}-rank{r}.safetensors" for part in ("ema", "model", "optimizer", "rng") for r in (0, 1)]
    assert not (step4 / "model.safetensors").exists()
    # Consolidated, it is DDP's checkpoint to float rounding (reduce-scatter sums in another order).
    # Where a gradient is rounding alone (a conv bias before a GroupNorm of one channel per group, an
    # attention key bias), Adam turns it into a step of up to lr: those elements may differ by 4 x lr.
    joined_dir = root / "joined"
    assert main(["checkpoint", "consolidate", str(step4), "--out", str(joined_dir)]) == 0
    for part in ("model", "ema", "optimizer"):
        joined = load_file(str(joined_dir / f"{part}.safetensors"))
        reference = load_file(str(root / f"ddp/checkpoints/step-00000004/{part}.safetensors"))
        assert joined.keys() == reference.keys()
        differences = torch.cat([(joined[k].double() - reference[k].double()).abs().flatten() for k in reference])
        print(part, "largest difference", differences.max().item(), "share over 1e-6",
              (differences > 1e-6).double().mean().item())
        assert (differences > 1e-6).double().mean() < 0.01, part
        if part != "optimizer":  # Adam's second moments are squares of gradients: compared in share only
            assert differences.max() <= 4 * 1e-4, part
    # The final model rank 0 gathered holds exactly the EMA weights the processes held in parts.
    final = load_file(str(root / "fsdp/model/unet/diffusion_pytorch_model.safetensors"))
    ema = load_file(str(joined_dir / "ema.safetensors"))
    assert all(torch.equal(final[key.removeprefix("unet.")], value) for key, value in ema.items())
    raw = load_file(str(root / "fsdp/model-no-ema/unet/diffusion_pytorch_model.safetensors"))
    joined_model = load_file(str(joined_dir / "model.safetensors"))
    assert all(torch.equal(raw[key.removeprefix("unet.")], value) for key, value in joined_model.items())
    assert not all(torch.equal(raw[key.removeprefix("unet.")], value) for key, value in ema.items())
    assert (joined_dir / "config.yaml").is_file()  # consolidated elsewhere, it keeps what sample reads

    # Resumed at step 2, every process's parts at step 4 are the straight run's.
    _assert_same_tensors(step4, root / "fsdp-halves/checkpoints/step-00000004",
                            sorted(p.name for p in step4.glob("*-rank*.safetensors")))
    # An FSDP checkpoint does not resume as data parallel (its files are parts), and says so.
    assert main(["train", str(runs.resumed["fsdp"]), "--set", "training.max_steps=6", "--resume", "latest"]) == 2
    assert "written by a FSDP run and this one is data parallel" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_what_ddp_trains_through_a_resume_with_partitioned_state(runs, stage, capsys):
    root, name = runs.root, f"zero{stage}"
    out = runs.outputs[name]
    assert f"DeepSpeed ZeRO-{stage}: {'optimizer' if stage == 2 else 'weights and optimizer'} split over 2" in out
    assert "unet: 0.79M trainable parameters" in out  # at stage 3 too, where a parameter is a placeholder
    # Per process, against DDP's whole weights (4 bytes a parameter) and Adam's moments (8): ZeRO-2 keeps the
    # whole weights and half of the fp32 masters (4) and moments, (4 + 12/2) / 12. ZeRO-3 also keeps whole, on
    # every process, each parameter under 1e5 elements (stage3_param_persistence_threshold), which is every
    # one of the tiny UNet: whole weights, half of its weight partitions, masters and moments, (4 + 16/2) / 12.
    # (SD's UNet holds most of its weights in larger parameters: benchmarks/scale.py.)
    ratio = _state_mib(out) / _state_mib(runs.outputs["ddp"])
    assert abs(ratio - (10 / 12 if stage == 2 else 12 / 12)) < 0.03, ratio

    # The model and EMA are whole, as rank 0 writes them in any run (at stage 3 gathered from all processes).
    # Both ZeRO runs stopped at step 2 and resumed. ZeRO-2 with two processes reduces gradients as DDP does
    # (a sum of two has one order, and halving is exact), but its fused AdamW steps one flat buffer, whose SIMD
    # lanes round the moments' last bits otherwise than many tensors (below): weights within a few ulps, which
    # some data sets round to bitwise equal and others do not. ZeRO-3 reduces in other buckets and offloads:
    # float rounding, with Adam's lr steps on rounding-only gradients as under FSDP. A resume that lost the
    # moments or the EMA's partitions would move most weights by about lr (1e-4), far past these bounds.
    step4, reference = root / f"{name}/checkpoints/step-00000004", root / "ddp/checkpoints/step-00000004"
    assert sorted(p.name for p in (root / name / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    if stage == 2:
        assert torch.allclose(torch.tensor(losses(root / name)), torch.tensor(losses(root / "ddp")), rtol=1e-6, atol=0)
    assert torch.allclose(torch.tensor(losses(root / name)), torch.tensor(losses(root / "ddp")), rtol=1e-4, atol=1e-6)
    for part in ("model", "ema"):
        mine, theirs = load_file(str(step4 / f"{part}.safetensors")), load_file(str(reference / f"{part}.safetensors"))
        assert mine.keys() == theirs.keys(), part
        differences = torch.cat([(mine[k].double() - theirs[k].double()).abs().flatten() for k in theirs])
        print(name, part, "largest difference", differences.max().item(), "share over 1e-6",
              (differences > 1e-6).double().mean().item())
        assert differences.max() <= (2e-6 if stage == 2 else 4 * 1e-4), part
        assert (differences > 1e-6).double().mean() < (1e-3 if stage == 2 else 0.01), part
    # Each process wrote its partition of the optimizer; together the fp32 masters are the model's weights.
    assert sorted(p.name for p in step4.glob("optimizer*")) == [
        f"optimizer-rank{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
    assert json.loads((step4 / "state.json").read_text())["zero_stage"] == stage
    masters = torch.cat([t for r in (0, 1) for k, t in load_file(str(step4 / f"optimizer-rank{r}.safetensors")).items()
                         if k.startswith("master.")])
    model = load_file(str(step4 / "model.safetensors"))
    weights = torch.cat([v.flatten() for v in model.values()])
    padding = masters.numel() - weights.numel()
    # ZeRO-3 pads each parameter to a multiple of the process count (2); ZeRO-2 pads nothing here.
    assert padding == (0 if stage == 2 else sum(v.numel() % 2 for v in model.values())), padding
    # ZeRO orders its flat buffers its own way, and pads with zeros.
    assert torch.equal(masters.sort().values, torch.cat([weights, torch.zeros(padding)]).sort().values)
    # Samples were drawn (rank 0's plain copy, the EMA swapped into the partitions, right after a step).
    assert (root / name / "samples" / "step-00000004.png").is_file()
    # The final model (EMA) and model-no-ema are the checkpoint's, bit for bit.
    for folder, part in (("model", "ema"), ("model-no-ema", "model")):
        final = load_file(str(root / f"{name}/{folder}/unet/diffusion_pytorch_model.safetensors"))
        saved = load_file(str(step4 / f"{part}.safetensors"))
        assert all(torch.equal(final[key.removeprefix("unet.")], value) for key, value in saved.items()), folder

    assert "resumed from" in runs.outputs[name]
    if stage == 2:  # DDP's optimizer state after a resume at step 2, to rounding, proves the resume kept it
        zero_moments, ddp_state = (torch.cat([load_file(str(step4 / f"optimizer-rank{r}.safetensors"))[f"0.{slot}"]
                                              for r in (0, 1)]) for slot in ("exp_avg", "exp_avg_sq")), \
            load_file(str(reference / "optimizer.safetensors"))
        count = len({key.split(".")[0] for key in ddp_state})
        for slot, zero_values in zip(("exp_avg", "exp_avg_sq"), zero_moments):
            ddp_values = torch.cat([ddp_state[f"{i}.{slot}"].flatten() for i in range(count)])  # parameter order
            # Last bits only: the fused AdamW kernel meets one flat buffer in other SIMD lanes than many tensors,
            # and steps 3-4 see gradients of weights a few ulps apart. Moments reset or lost at the resume would
            # differ by tens of percent.
            scale = ddp_values.abs().max().item()
            torch.testing.assert_close(zero_values[:ddp_values.numel()], ddp_values, rtol=1e-5, atol=1e-6 * scale,
                                       msg=slot)
    # The model is whole: nothing to consolidate; resuming as data parallel is refused.
    assert main(["checkpoint", "consolidate", str(step4)]) == 2
    assert f"DeepSpeed ZeRO-{stage} checkpoint's model and EMA are whole" in capsys.readouterr().err
    assert main(["train", str(runs.resumed[name]), "--set", "training.max_steps=6", "--resume", "latest"]) == 2
    assert f"written by a DeepSpeed ZeRO-{stage} run and this one is data parallel" in capsys.readouterr().err


def test_two_machines_on_loopback_train_what_one_machine_does(runs):
    """`--num_machines 2`, one process each, against one machine of two processes: the data shard and the
    random stream follow the global rank, so the shared checkpoint matches bit for bit."""
    one, two = (runs.root / run / "checkpoints/step-00000002" for run in ("ddp", "two-machines"))
    # The second machine's rank wrote its random state into the one shared checkpoint.
    assert sorted(p.name for p in two.glob("rng-rank*")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    assert json.loads((two / "state.json").read_text())["world_size"] == 2
    _assert_same_tensors(one, two, ["model.safetensors", "ema.safetensors", "optimizer.safetensors",
                                    "rng-rank0.safetensors", "rng-rank1.safetensors"], every_rng=True)
    assert not list((runs.root / "two-machines" / "checkpoints").glob(".tmp-*"))  # one writer finished the save


def test_a_data_parallel_checkpoint_resumes_in_another_number_of_processes(runs, tmp_path, capsys):
    """Two processes' step-4 checkpoint goes on in one: from the same point of the epoch's order (2 batches of
    3 a process read, so 2 x 2 of 6 for one), with its weights and optimizer state; a sharded one is refused."""
    shutil.copytree(runs.root / "ddp", tmp_path / "ddp")
    shutil.rmtree(tmp_path / "ddp/model")
    assert main(["train", str(runs.ddp), "--no-progress", "--set", f"output_dir={tmp_path / 'ddp'}", "--set",
                 "training.max_steps=6", "--resume", str(tmp_path / "ddp/checkpoints/step-00000004")]) == 0
    out = capsys.readouterr().out
    assert "written by 2 process(es) and this run has 1: each step now trains on 4 images (was 8)" in out
    assert "(epoch 1, batch 4 of 12 a process)" in out and "run finished at step 6/6" in out
    state = json.loads((tmp_path / "ddp/checkpoints/step-00000006/state.json").read_text())
    assert state["world_size"] == 1 and state["position"] == {"epoch": 1, "batch": 8}


def test_a_signal_to_one_process_stops_every_process_at_one_step_with_a_checkpoint(runs):
    """Rank 1 alone gets SIGTERM during step 2 (signal_probe.py): the processes agree to stop after step 3,
    each saying so, with a checkpoint there that resumes to the straight run's bits (the test below)."""
    exit_line, checkpoints, output = (runs.root / "signalled.out").read_text().split("\n", 2)
    assert exit_line != "exit 0" and checkpoints == "step-00000002 step-00000003", (checkpoints, output[-3000:])
    assert output.count("interrupted: checkpoint saved at step 3; --resume latest continues from here") == 2
    assert output.count("SIGTERM: finishing this step") == 1


def test_muon_under_ddp_resumes_bitwise_and_differs_from_adamw(runs):
    """Every rank orthogonalises the same all-reduced momentum, so the whole state is rank 0's to save; resumed
    from the checkpoint a signal stopped it at, step 3."""
    straight, resumed = (runs.root / run / "checkpoints/step-00000004" for run in ("muon", "muon-halves"))
    _assert_same_tensors(straight, resumed, ["model.safetensors", "ema.safetensors", "optimizer.safetensors",
                                             "rng-rank0.safetensors", "rng-rank1.safetensors"])
    assert [group["muon"] for group in json.loads((straight / "state.json").read_text())["optimizer"]["param_groups"]
            ] == [True, False]
    adamw = load_file(str(runs.root / "ddp/checkpoints/step-00000004/model.safetensors"))
    muon = load_file(str(straight / "model.safetensors"))
    assert not torch.equal(adamw["unet.down_blocks.0.resnets.0.conv1.weight"],
                           muon["unet.down_blocks.0.resnets.0.conv1.weight"])


def test_a_run_folder_one_process_cannot_see_stops_every_process_at_resume(runs):
    report = (runs.root / "unshared.out").read_text()
    assert not report.startswith("exit 0"), report[-2000:]
    assert "--resume latest: no checkpoint under" in report  # rank 1's own reason
    assert "1 other process(es) cannot start this run" in report and "run folder is not shared" in report  # rank 0
    assert not (runs.root / "ddp/checkpoints/step-00000006").exists()


def test_a_checkpoint_part_one_process_lacks_stops_every_process_before_any_loads(runs):
    report = (runs.root / "partless.out").read_text()
    assert not report.startswith("exit 0"), report[-2000:]
    assert "checkpoint is missing rng-rank1.safetensors" in report  # rank 1's own reason
    assert "1 other process(es) cannot read their part of step-00000004" in report, report[-2000:]  # rank 0's
    assert "resumed from" not in report  # and its settings are not written as the run's
    assert "learning_rate: 0.0005" not in (runs.root / "partless/config.yaml").read_text()


def test_an_evaluation_only_the_main_process_checks_stops_every_process_with_its_reason(runs):
    report = (runs.root / "uneval.out").read_text()
    assert not report.startswith("exit 0"), report[-2000:]
    assert "none.safetensors" in report, report[-2000:]  # rank 0's own reason
    assert "stopped: the main process cannot evaluate as the config asks" in report, report[-2000:]  # rank 1's
    assert "trainer.py" not in report, report[-3000:]  # no worker's traceback (the launcher's own is there)


def test_consolidate_refuses_a_whole_checkpoint_and_a_missing_part(tmp_path, capsys):
    assert main(["checkpoint", "consolidate", str(tmp_path / "step-2")]) == 2  # (it said "already whole")
    assert "not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "step-2").mkdir()
    (tmp_path / "step-2" / "state.json").write_text("{}")
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


def test_rank_0_rebuilds_models_from_their_config_and_wrappers_from_their_children(tiny_sd):  # noqa: F811
    from diffusers import AutoencoderKL

    from difftrain.methods.vae import Autoencode
    from difftrain.training.sharding import ShardingError, rebuilt

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    copy = rebuilt(Autoencode(vae))
    assert type(copy) is Autoencode and type(copy.vae) is AutoencoderKL and copy.vae.config == vae.config
    assert copy.state_dict().keys() == Autoencode(vae).state_dict().keys()
    with pytest.raises(ShardingError, match="cannot rebuild an unsharded Linear"):
        rebuilt(torch.nn.Linear(2, 2))


def _accelerator(stage: int, zero3_init: bool | None = None) -> SimpleNamespace:
    """What `zero.configure` reads of an Accelerator: accelerate's own DeepSpeedPlugin, as a launch builds it."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=stage, zero3_init_flag=zero3_init)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)


def test_deepspeed_follows_the_run_config_and_refuses_what_it_cannot_train(make_config, tiny_sd, shapes_dir,  # noqa: F811
                                                                             tmp_path):
    from difftrain.config import parse_config
    from difftrain.training import sharding, zero

    def config(**sections):
        return parse_config(yaml.safe_load(make_config(**sections).read_text()))

    accelerator = _accelerator(2)
    run = config(training={"batch_size": 3, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5})
    assert zero.configure(accelerator, run) == 2
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (3, 2, 12, 0.5)
    with pytest.raises(zero.ZeroError, match="mixed_precision: bf16 under DeepSpeed is not supported yet"):
        zero.configure(_accelerator(2), config(training={"mixed_precision": "bf16"}))
    with pytest.raises(zero.ZeroError, match="training.compile: true under DeepSpeed is not supported"):
        zero.configure(_accelerator(2), config(training={"compile": True}))
    nvme = _accelerator(2)
    nvme.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["offload_optimizer"] = {"device": "nvme"}
    with pytest.raises(zero.ZeroError, match="NVMe offload swaps the optimizer state out"):
        zero.configure(nvme, run)
    # Stage 3 trains with the frozen models loaded whole, which zero3_init_flag would partition.
    with pytest.raises(zero.ZeroError, match="zero3_init_flag: true would partition every model transformers loads"):
        zero.configure(_accelerator(3), run)  # accelerate's default at stage 3
    assert zero.configure(_accelerator(3, zero3_init=False), run) == 3
    lora = sd_config(tmp_path, shapes_dir, tiny_sd, lora={"enabled": True, "rank": 2})
    with pytest.raises(sharding.ShardingError, match="ZeRO partitions the optimizer state; a LoRA run trains a few MB"):
        zero.configure(_accelerator(2), parse_config(yaml.safe_load(lora.read_text())))
    with pytest.raises(zero.ZeroError, match="trains one module per run and this config trains 2 .unet, text_encoder"):
        zero.check_trainable({"unet": torch.nn.Linear(1, 1), "text_encoder": torch.nn.Linear(1, 1)}, stage=2)
    with pytest.raises(sharding.ShardingError, match="cannot rebuild an unsharded Linear"):  # rank 0's copy at stage 3
        zero.check_trainable({"unet": torch.nn.Linear(1, 1)}, stage=3)


def test_a_deepspeed_launch_without_deepspeed_names_the_extra(make_config, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # as if not installed
    assert main(["train", str(make_config())]) == 2
    assert "deepspeed is not installed: pip install -e '.[deepspeed]'" in capsys.readouterr().err


def test_fsdp_under_half_precision_reduces_gradients_in_fp32():
    """accelerate's FSDP policy for bf16 reduce-scatters in bf16; DDP reduces fp32 gradients. The weights are
    still gathered and computed in bf16. (A bf16 FSDP launch on 2 CPU processes trained with it, by hand.)"""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from difftrain.training.sharding import reduce_in_fp32

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's own
    reduce_in_fp32(SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin)))
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32,
                                                                             torch.bfloat16)
