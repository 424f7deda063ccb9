"""Textual Inversion files we write load through diffusers' load_textual_inversion, both layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difftrain.models.embeddings import EmbeddingFileError, load_embedding, save_embedding

TOKEN = "<tok>"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from difftrain.models.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_ti"), seed=0)


def load_pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True)


@pytest.fixture(scope="session")
def vectors():
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(0))  # the tiny CLIP's width is 32


@pytest.fixture(scope="session")
def saved(vectors, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedding")
    return save_embedding(out, TOKEN, vectors, metadata={"base_model": "tiny-sd", "steps": 500})


def encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():  # encode_prompt expands "<tok>" into "<tok> <tok>_1" as it does at sampling
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def new_rows(pipe, tokens) -> torch.Tensor:
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


def test_files_and_layouts(saved, vectors):
    diffusers_file, a1111_file = saved
    assert diffusers_file.name == "learned_embeds.safetensors"
    assert a1111_file.name == "tok.safetensors"  # "<" and ">" are not allowed in Windows file names
    diffusers_state, a1111_state = load_file(diffusers_file), load_file(a1111_file)
    assert list(diffusers_state) == [TOKEN] and torch.equal(diffusers_state[TOKEN], vectors)
    assert list(a1111_state) == ["emb_params"] and torch.equal(a1111_state["emb_params"], vectors)
    for path in saved:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["base_model"] == "tiny-sd" and meta["steps"] == "500"
        assert meta["token"] == TOKEN and meta["num_vectors"] == "2"


def test_diffusers_loads_the_diffusers_file(tiny_dir, saved, vectors):
    pipe = load_pipe(tiny_dir)
    before = len(pipe.tokenizer)
    without = encode(pipe, "a dog")
    pipe.load_textual_inversion(saved[0].parent)  # the folder: diffusers finds learned_embeds.safetensors
    assert len(pipe.tokenizer) == before + 2
    assert pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"]) == [before, before + 1]
    torch.testing.assert_close(new_rows(pipe, [TOKEN, f"{TOKEN}_1"]), vectors, rtol=0, atol=0)
    with_token = encode(pipe, f"a {TOKEN} dog")
    assert (with_token - without).abs().max() > 0.1
    torch.testing.assert_close(encode(pipe, "a dog"), without)  # prompts without the token are untouched


def test_diffusers_loads_the_a1111_file_with_a_token(tiny_dir, saved, vectors):
    pipe = load_pipe(tiny_dir)
    before = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(saved[1]), token=TOKEN)
    assert len(pipe.tokenizer) == before + 2
    torch.testing.assert_close(new_rows(pipe, [TOKEN, f"{TOKEN}_1"]), vectors, rtol=0, atol=0)

    # Both files give the same prompt embedding.
    other = load_pipe(tiny_dir)
    other.load_textual_inversion(str(saved[0]))  # the file itself, token from its key
    torch.testing.assert_close(encode(pipe, f"a {TOKEN} dog"), encode(other, f"a {TOKEN} dog"))


def test_load_embedding_round_trips(saved, vectors, tmp_path):
    token, got = load_embedding(saved[0])
    assert token == TOKEN and torch.equal(got, vectors)
    assert load_embedding(saved[0].parent)[0] == TOKEN
    token, got = load_embedding(saved[1])
    assert token is None and torch.equal(got, vectors)  # A1111: the token is the file name
    # An older diffusers run's folder holds learned_embeds.bin: a folder falls back to it, as diffusers' does.
    (tmp_path / "old").mkdir()
    torch.save({"<old>": vectors}, tmp_path / "old" / "learned_embeds.bin")
    token, got = load_embedding(tmp_path / "old")
    assert token == "<old>" and torch.equal(got, vectors)

    # A1111's own .pt layout and a one-vector embedding saved as [dim].
    a1111 = {"string_to_param": {"*": vectors}, "name": "tok", "step": 500, "string_to_token": {"*": 265}}
    torch.save(a1111, tmp_path / "tok.pt")
    token, got = load_embedding(tmp_path / "tok.pt")
    assert token is None and torch.equal(got, vectors)
    one_diffusers, _ = save_embedding(tmp_path / "one", "<one>", vectors[0])
    assert load_embedding(one_diffusers)[1].shape == (1, 32)
    # One key under another file name: the file name is the word, as A1111 and ComfyUI read it ("clip_l" is
    # how SD 1.x embeddings from SDXL-era tools name their vectors; renamed diffusers files keep "<token>").
    for key in ("clip_l", "*", "<cat-toy>"):
        save_file({key: vectors}, tmp_path / "my-style.safetensors")
        assert load_embedding(tmp_path / "my-style.safetensors")[0] is None
    save_file({"clip_g": torch.zeros(2, 1280)}, tmp_path / "big.safetensors")
    with pytest.raises(EmbeddingFileError, match="an SDXL embedding"):
        load_embedding(tmp_path / "big.safetensors")


def test_clear_errors(tmp_path, vectors):
    with pytest.raises(EmbeddingFileError, match="one word without spaces"):
        save_embedding(tmp_path, "my style", vectors)
    with pytest.raises(EmbeddingFileError, match=r"float tensor \[n_vectors, dim\], got \[1, 2, 32\]"):
        save_embedding(tmp_path, TOKEN, vectors[None])
    with pytest.raises(EmbeddingFileError, match="nothing usable as a file name"):
        save_embedding(tmp_path, "<>", vectors)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(EmbeddingFileError, match="no such embedding file"):
        load_embedding(tmp_path / "missing.safetensors")
    save_file({"clip_l": vectors, "clip_g": torch.zeros(2, 64)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(EmbeddingFileError, match=r"keys \['clip_g', 'clip_l'\].*SDXL"):
        load_embedding(tmp_path / "sdxl.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbeddingFileError, match="not a readable .safetensors file"):
        load_embedding(tmp_path / "junk.safetensors")
