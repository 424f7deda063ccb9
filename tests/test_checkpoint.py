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


def test_keep_last_prunes_the_oldest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        (store.begin(step) / "state.json").write_text("{}")
        store.commit(step)
    assert [p.name for p in store.all()] == ["step-00000002", "step-00000003"]
