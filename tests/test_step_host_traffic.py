"""A training step asks nothing of the host: it builds no tensor from host data (on a GPU that
is a blocking copy, a wait for every kernel queued before it), reads no value back (`.item()`,
`.tolist()`, which wait likewise) and makes no tensor whose size depends on values (a boolean
mask's indexing, `nonzero`, `unique`: the host waits for the size). What the step needs from the
host (token ids, class labels) comes with the batch from the data loader. Checked here on a CPU,
where the same calls are made."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from test_controlnet_train import cn_config, mask_shapes  # noqa: F401
from test_personalise import dreambooth_config
from test_text2image import sd_config, tiny_sd  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from difftrain.config import load_config
from difftrain.data.dataset import make_loader


SIZED_BY_VALUES = (torch.ops.aten.nonzero, torch.ops.aten.masked_select, torch.ops.aten._unique2,
                   torch.ops.aten.unique_dim, torch.ops.aten.unique_consecutive)


class HostTraffic(TorchDispatchMode):
    """Tensors made from host data (aten.lift_fresh: `torch.tensor(...)`, a tokenizer's
    return_tensors="pt") and values read back to the host, while active."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple] = []
        self.read: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy):
            self.made.append(tuple(args[0].shape))
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self.read.append("item")
        # An output whose size depends on the values (boolean-mask indexing, nonzero, unique): on a GPU
        # the host must read that size back before it can queue anything after.
        if func.overloadpacket in SIZED_BY_VALUES or (
                func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.read.append(str(func))
        return func(*args, **(kwargs or {}))


def step_traffic(config_path, monkeypatch) -> HostTraffic:
    """The host traffic of one step (loss, backward, optimizer, schedule, EMA) on a batch from the run's own loader,
    after a first step (lazy set-up such as the scheduler's tables moving to the device is allowed)."""
    from difftrain.training.trainer import Trainer

    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(load_config(config_path), progress=False)
    batches = iter(make_loader(trainer.dataset, trainer.sampler, 0, trainer.method.collate))

    def step(batch):  # the loop's per-step work (clipping aside: on a CPU it reads the norm, on a GPU it does not)
        loss = trainer.method.loss(trainer.wrapped, batch, trainer.noise_generator)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.lr_schedule.step()
        for name, ema in trainer.emas.items():
            ema.step(trainer.modules[name])

    step(next(batches))
    batch = next(batches)  # the loader's work (decoding, tokenising) is the host's, outside the step
    traffic = HostTraffic()
    original = torch.Tensor.tolist  # reads the data directly, past the dispatcher: counted by hand

    def tolist(tensor):
        traffic.read.append("tolist")
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with traffic:
        step(batch)
    monkeypatch.undo()
    return traffic


@pytest.mark.parametrize("run", ["text2image", "text encoder trained", "dreambooth", "textual inversion",
                                 "class-conditional", "controlnet", "t2i adapter"])
def test_a_training_step_makes_no_host_tensor_and_reads_nothing_back(run, tiny_sd, shapes_dir, mask_shapes,  # noqa: F811
                                                                    tmp_path, monkeypatch):
    dropout = {"caption_dropout": 0.5}  # the dropped captions' branch in both the frozen and trained paths
    config = {
        "text2image": lambda: sd_config(tmp_path, shapes_dir, tiny_sd, text2image=dropout),
        "text encoder trained": lambda: sd_config(tmp_path, shapes_dir, tiny_sd,
                                                  text2image={**dropout, "train_text_encoder": True}),
        "dreambooth": lambda: dreambooth_config(tmp_path, shapes_dir, tiny_sd, training={"batch_size": 2}),
        "textual inversion": lambda: sd_config(tmp_path, shapes_dir, tiny_sd, method="textual_inversion",
                                               textual_inversion={"token": "<shape>", "initializer": "square"}),
        "class-conditional": lambda: sd_config(tmp_path, shapes_dir, tiny_sd, method="unconditional",
                                               model={"base": None, "preset": "tiny", "classes": "captions"}),
        "controlnet": lambda: cn_config(tmp_path, mask_shapes, tiny_sd, controlnet={"proportion_empty_prompts": 0.5}),
        "t2i adapter": lambda: sd_config(tmp_path, mask_shapes, tiny_sd, method="t2i_adapter", t2i_adapter={
            "preprocess": "mask", "proportion_empty_prompts": 0.5}),
    }[run]()
    traffic = step_traffic(config, monkeypatch)
    assert (traffic.made, traffic.read) == ([], [])
