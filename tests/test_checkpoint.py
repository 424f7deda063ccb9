import pytest
import torch

from difftrain.training.checkpoint import CheckpointStore, optimizer_from_parts, optimizer_to_parts


def test_optimizer_state_round_trips_through_safetensors_parts():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, rest = optimizer_to_parts(optimizer.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(optimizer_from_parts(tensors, rest))
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_half_written_checkpoint_is_never_latest_and_is_cleaned(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (10, 20):
        staging = store.begin(step)
        (staging / "state.json").write_text("{}")
        store.commit(step)
    # A save killed halfway: the staging folder exists, partly written.
    staging = store.begin(30)
    (staging / "model.safetensors").write_bytes(b"partial")
    assert store.latest().name == "step-00000020"
    store.clean_staging()
    assert not staging.exists()


def test_keep_last_prunes_the_oldest(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        (store.begin(step) / "state.json").write_text("{}")
        store.commit(step)
    assert [p.name for p in store.all()] == ["step-00000002", "step-00000003"]
    # Pruning renames before it deletes: one killed halfway leaves a name the next start clears, never a step-N
    # whose state.json outlived some of its weights.
    from difftrain.training import checkpoint

    real_rmtree = checkpoint.shutil.rmtree

    def killed(path, ignore_errors=False):  # the process dies as it starts deleting the pruned checkpoint
        if str(path).endswith(".pruned"):
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    (store.begin(4) / "state.json").write_text("{}")
    store.commit(4)
    (store.begin(5) / "state.json").write_text("{}")
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.commit(5)
    monkeypatch.undo()
    assert [p.name for p in store.all()] == ["step-00000004", "step-00000005"]
    store.clean_staging()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_every_generator_round_trips_through_safetensors_accelerators_included(tmp_path, monkeypatch):
    import random

    import numpy as np
    from safetensors.torch import load_file, save_file

    from difftrain.training import rng

    # No accelerator here: Apple's stands in with a CPU generator behind its get/set_rng_state, which is all
    # capture and restore ask of one (dropout's masks on MPS come from it).
    mps_generator = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps_generator.get_state())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: mps_generator.set_state(state))

    def draws(noise):
        return (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=noise).item(),
                torch.rand(1, generator=mps_generator).item())

    noise = torch.Generator().manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # a cached second Gaussian in both
    save_file(rng.capture(noise), tmp_path / "rng.safetensors")
    expected = draws(noise)
    draws(noise)
    rng.restore(load_file(tmp_path / "rng.safetensors"), noise)
    assert draws(noise) == expected
