"""The work after each backward, on an SD-shaped UNet (54M parameters): gradient clipping, AdamW and
the EMA update, each as the field's scripts do it and as difftrain does it. One process, same
parameters and gradients.

    .venv/bin/python benchmarks/optimizer_step.py [--repeats 5]

- clipping: torch's clip_grad_norm_ (what accelerate calls) against difftrain's clip_gradients, with
  gradients within the limit (the usual case: it then skips torch's multiply by 1.0) and beyond it;
- AdamW: torch's default (per-tensor on CPU), foreach, and fused, which difftrain uses; then
  `training.optimizer: muon` (Muon on the hidden matrices, fused AdamW on the rest), here and on
  the demo's UNet (`mini`, 0.69M parameters), where Muon's Newton-Schulz matmuls weigh more;
- EMA: diffusers' EMAModel.step (per tensor, and foreach) against difftrain's Ema.step (one lerp).
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(step, repeats: int, device: torch.device, setup=lambda: None) -> float:
    """Median seconds of `step`, `setup` run untimed before each (one untimed call first: state
    allocation is not a step)."""
    step()
    times = []
    for _ in range(repeats):
        setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def report(title: str, results: dict[str, float]) -> None:
    base_name, base = next(iter(results.items()))
    print(f"\n{title}")
    for name, seconds in results.items():
        print(f"  {name:42s} {seconds * 1000:8.1f} ms/step   x{base / seconds:5.2f} against {base_name}")


def muon_step(unet: torch.nn.Module):
    """The step of the optimizer a run with `training.optimizer: muon` builds for this UNet."""
    from difftrain.config import TrainingConfig
    from difftrain.training.optim import build_optimizer

    training = TrainingConfig(optimizer="muon", learning_rate=1e-4)
    return build_optimizer([{"params": list(unet.parameters())}], training, {"unet": unet}).step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from difftrain.config import EmaConfig
    from difftrain.models.tiny_sd import tiny_sd_components
    from difftrain.models.unet import build_unet
    from difftrain.training.ema import Ema
    from difftrain.training.host_memory import configure
    from difftrain.training.optim import clip_gradients

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # SD 1.5's UNet at a quarter of its width (54M parameters), as in text2image_step.py.
    unet = tiny_sd_components(unet_channels=(80, 160, 320, 320), layers_per_block=2, text_hidden=192,
                              sample_size=128)["unet"].to(device)
    params = list(unet.parameters())
    generator = torch.Generator(device).manual_seed(0)
    gradients = [torch.randn(p.shape, generator=generator, device=device) * 1e-5 for p in params]

    def fresh_gradients():  # a norm of ~0.07: within a limit of 1.0, as the demo's gradients were (0.16-0.33)
        for p, gradient in zip(params, gradients):
            p.grad = gradient.clone()

    fresh_gradients()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters")

    accelerator = Accelerator(cpu=device.type == "cpu")
    print(f"host memory: {configure('auto', device)} (as in training)")
    for limit, case in ((1.0, "within the limit"), (1e-3, "beyond it")):
        report(f"gradient clipping, gradients {case}", {
            "torch clip_grad_norm_": timed(lambda: torch.nn.utils.clip_grad_norm_(params, limit), args.repeats,
                                           device, fresh_gradients),
            "difftrain clip_gradients": timed(lambda: clip_gradients(accelerator, params, limit), args.repeats,
                                              device, fresh_gradients)})

    adamw = {}
    for name, options in [("default", {}), ("foreach", {"foreach": True}), ("fused (difftrain)", {"fused": True})]:
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        adamw[name] = timed(optimizer.step, args.repeats, device)
        del optimizer
    adamw["muon (difftrain)"] = timed(muon_step(unet), args.repeats, device)
    report("AdamW", adamw)
    demo_unet = build_unet("mini", None, 3, 32, num_class_embeds=13).to(device)
    for p in demo_unet.parameters():
        p.grad = torch.randn(p.shape, generator=generator, device=device) * 1e-3
    report("the demo's UNet (mini, 0.69M parameters)", {
        "fused AdamW": timed(torch.optim.AdamW(demo_unet.parameters(), lr=1e-3, fused=True).step, args.repeats,
                             device),
        "muon (difftrain)": timed(muon_step(demo_unet), args.repeats, device)})

    ema = {}
    for foreach in (False, True):
        averaged = EMAModel(params, decay=0.9999, power=0.75, use_ema_warmup=True, foreach=foreach)
        ema[f"diffusers EMAModel{', foreach' if foreach else ''}"] = timed(
            lambda: averaged.step(params), args.repeats, device)
    ours = Ema(unet, EmaConfig(decay=0.9999, power=0.75))
    ema["difftrain Ema (one lerp a tensor)"] = timed(lambda: ours.step(unet), args.repeats, device)
    report("EMA update", ema)


if __name__ == "__main__":
    main()
