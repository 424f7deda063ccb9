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
