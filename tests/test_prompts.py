"""A1111 prompt handling: attention syntax, 75-token chunks, weighted encoding, LoRA tags."""

from __future__ import annotations

import itertools

import pytest
import torch

from difftrain.models.tiny_sd import WORDS
from difftrain.sampling.prompts import (
    BREAK,
    PromptError,
    encode_pair,
    encode_prompt,
    extract_lora_tags,
    parse_attention,
    tokenize_weighted,
    weight_embeddings,
)

# prompt -> runs; the first six are the web UI's own doctest examples
PARSED = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    r"\(literal\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ],
    "[x]": [("x", 1 / 1.1)],
    "[[x]": [("x", 1 / 1.1 / 1.1)],
    "(word:1.5) rest": [("word", 1.5), (" rest", 1.0)],
    "(word : 0.5 )": [("word ", 0.5)],
    r"a \\ b": [("a \\ b", 1.0)],
    "closing) without:1.5) opening": [("closing) without:1.5) opening", 1.0)],
    "": [("", 1.0)],
    "a BREAK b": [("a", 1.0), BREAK, ("b", 1.0)],
    "a BREAKfast, break": [("a BREAKfast, break", 1.0)],
    "(a BREAK b)": [("a", 1.1), BREAK, ("b", 1.1)],
}


@pytest.mark.parametrize("text", PARSED)
def test_parse_attention(text):
    got = parse_attention(text)
    want = PARSED[text]
    assert [piece for piece, _ in got] == [piece for piece, _ in want]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in want])


def test_a_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(PromptError, match="not a weight"):
        parse_attention("(word:1.2.3)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import CLIPTextModel, CLIPTokenizer

    from difftrain.models.tiny_sd import write_tiny_sd

    folder = write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    # A fresh layer norm has bias 0, so every output vector has mean ~0 and restoring a chunk's
    # mean divides noise by noise; a trained CLIP's final norm has a real bias.
    with torch.no_grad():
        encoder.final_layer_norm.bias.copy_(torch.linspace(-0.2, 0.6, encoder.config.hidden_size))
    return tokenizer, encoder


def words(count: int, start: int = 0) -> str:
    """`count` words, each one token in the tiny tokenizer."""
    single = [w for w in WORDS if w not in ("a", "an")]
    return " ".join(itertools.islice(itertools.cycle(single), start, start + count))


def prompt_tokens(chunk, eos: int) -> list[int]:
    return chunk.ids[1 : chunk.ids.index(eos, 1)]


def test_a_long_prompt_is_split_into_framed_chunks_of_75(tiny):
    tokenizer, _ = tiny
    text = words(200)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(expected) == 200

    chunks = tokenize_weighted(tokenizer, text)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert [len(c.ids) for c in chunks] == [77, 77, 77]
    assert all(len(c.weights) == 77 and c.ids[0] == bos for c in chunks)
    assert chunks[0].ids[76] == chunks[1].ids[76] == eos
    assert chunks[2].ids[51] == eos and chunks[2].ids[52:] == [pad] * 25
    assert sum((prompt_tokens(c, eos) for c in chunks), []) == expected


def test_a_full_chunk_ends_at_a_recent_comma(tiny):
    tokenizer, _ = tiny
    eos = tokenizer.eos_token_id
    text = words(70) + ", " + words(10, start=70)  # the comma is token 71 of 81

    first, second = tokenize_weighted(tokenizer, text)
    assert len(prompt_tokens(first, eos)) == 71
    assert first.ids[71] == tokenizer.convert_tokens_to_ids(",</w>")
    assert prompt_tokens(second, eos) == tokenizer(words(10, start=70), add_special_tokens=False)["input_ids"]

    # with the backtrack off, or a comma further back than 20 tokens, the chunk is simply full
    assert len(prompt_tokens(tokenize_weighted(tokenizer, text, comma_backtrack=0)[0], eos)) == 75
    far = words(40) + ", " + words(40, start=40)
    assert len(prompt_tokens(tokenize_weighted(tokenizer, far)[0], eos)) == 75


def test_a_multi_vector_embedding_moves_to_the_next_chunk_whole(tiny):
    import copy

    tokenizer = copy.deepcopy(tiny[0])
    tokenizer.add_tokens(["<sq>", "<sq>_1", "<sq>_2"])  # as diffusers loads a 3-vector embedding
    vectors = tokenizer.convert_tokens_to_ids(["<sq>", "<sq>_1", "<sq>_2"])
    eos = tokenizer.eos_token_id
    # 73 words, then the embedding: two of its vectors would fit the first chunk, the third not.
    first, second = tokenize_weighted(tokenizer, words(73) + " <sq> <sq>_1 <sq>_2 " + words(3, start=73),
                                      comma_backtrack=0)
    assert len(prompt_tokens(first, eos)) == 73
    assert prompt_tokens(second, eos)[:3] == vectors
    # Where it fits, nothing moves.
    [whole] = tokenize_weighted(tokenizer, words(72) + " <sq> <sq>_1 <sq>_2")
    assert prompt_tokens(whole, eos)[-3:] == vectors


def test_break_starts_a_new_chunk_and_weights_follow_tokens(tiny):
    tokenizer, _ = tiny
    eos = tokenizer.eos_token_id
    red, dog = tokenizer.convert_tokens_to_ids(["red</w>", "dog</w>"])

    first, second = tokenize_weighted(tokenizer, "(red:1.5) BREAK [dog]")
    assert prompt_tokens(first, eos) == [red] and prompt_tokens(second, eos) == [dog]
    assert first.weights[:3] == [1.0, 1.5, 1.0] and second.weights[1] == pytest.approx(1 / 1.1)
    assert set(first.weights[2:]) == {1.0}


def test_the_empty_prompt_is_one_chunk_of_bos_eos_and_padding(tiny):
    tokenizer, _ = tiny
    (chunk,) = tokenize_weighted(tokenizer, "")
    assert chunk.ids == [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 75
    assert chunk.weights == [1.0] * 77


def test_unit_weights_encode_exactly_as_the_text_encoder(tiny):
    tokenizer, encoder = tiny
    ids = tokenizer("a red dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(encode_prompt(tokenizer, encoder, "a red dog", "cpu"), encoder(ids).last_hidden_state)

    long = encode_prompt(tokenizer, encoder, words(200), "cpu")
    assert long.shape == (1, 3 * 77, encoder.config.hidden_size)
    chunk_ids = torch.tensor([c.ids for c in tokenize_weighted(tokenizer, words(200))])
    with torch.no_grad():
        assert torch.allclose(long[0], encoder(chunk_ids).last_hidden_state.reshape(-1, long.shape[-1]), atol=1e-6)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(tiny):
    tokenizer, encoder = tiny
    ids = torch.tensor([tokenize_weighted(tokenizer, "a red dog")[0].ids])
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = encoder.final_layer_norm(hidden)
    assert torch.equal(encode_prompt(tokenizer, encoder, "a red dog", "cpu", clip_skip=2), expected)
    with pytest.raises(PromptError, match="clip_skip"):
        encode_prompt(tokenizer, encoder, "a red dog", "cpu", clip_skip=3)


def test_clip_skip_leaves_sd2s_open_clip_encoder_as_automatic1111_does(tiny, caplog):
    """A1111 applies "Clip skip" to SD 1.x's CLIP only; its SD 2 images say "Clip skip: 2" and are drawn as 1."""
    from transformers import CLIPTextModel

    from difftrain.sampling import prompts

    prompts._clip_skip_ignored.cache_clear()  # the notice is once a process
    tokenizer, encoder = tiny
    torch.manual_seed(0)
    open_clip = CLIPTextModel(type(encoder.config)(**{**encoder.config.to_dict(), "hidden_act": "gelu"})).eval()
    with torch.no_grad():
        plain = encode_prompt(tokenizer, open_clip, "a red dog", "cpu")
        assert torch.equal(encode_prompt(tokenizer, open_clip, "a red dog", "cpu", clip_skip=2), plain)
    assert "clip skip 2 ignored: SD 2.x's OpenCLIP text encoder" in caplog.text
    with torch.no_grad():  # SD 1.x's CLIP still takes it
        assert not torch.equal(encode_prompt(tokenizer, encoder, "a red dog", "cpu", clip_skip=2),
                               encode_prompt(tokenizer, encoder, "a red dog", "cpu"))


def test_a_weight_scales_its_token_then_the_chunk_mean_is_restored(tiny):
    tokenizer, encoder = tiny
    plain = encode_prompt(tokenizer, encoder, "a red dog", "cpu")[0]
    weighted = encode_prompt(tokenizer, encoder, "a (red:1.5) dog", "cpu")[0]
    assert weighted.mean() == pytest.approx(plain.mean().item(), rel=1e-5)

    # every vector is rescaled by the same factor c, and the weighted one ("red", position 2) by 1.5 c
    ratio = weighted / plain
    c = ratio[0, 0]
    others = torch.cat([ratio[:2], ratio[3:]])
    assert torch.allclose(others, torch.full_like(others, c.item()), rtol=1e-4)
    assert torch.allclose(ratio[2], torch.full_like(ratio[2], 1.5 * c.item()), rtol=1e-4)

    z = torch.randn(2, 5, 4)
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]] * 2)
    assert torch.equal(weight_embeddings(z, weights, restore_mean=False)[:, 1], 2 * z[:, 1])
    centred = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean exactly 0: nothing to restore, no NaN
    assert torch.equal(weight_embeddings(centred, torch.ones(1, 2)), centred)


def test_encode_pair_pads_the_shorter_side_with_empty_chunks(tiny):
    tokenizer, encoder = tiny
    positive, negative, padded = encode_pair(tokenizer, encoder, words(200), "blurry", "cpu")
    assert padded  # A1111's "Pad conds"
    assert positive.shape == negative.shape == (1, 3 * 77, encoder.config.hidden_size)

    blurry = encode_prompt(tokenizer, encoder, "blurry", "cpu")
    empty = encode_prompt(tokenizer, encoder, "", "cpu")
    assert torch.allclose(negative[:, :77], blurry, atol=1e-6)
    assert torch.allclose(negative[:, 77:154], empty, atol=1e-6)
    assert torch.allclose(negative[:, 154:], empty, atol=1e-6)
    assert torch.allclose(positive, encode_prompt(tokenizer, encoder, words(200), "cpu"), atol=1e-6)

    short, none, padded = encode_pair(tokenizer, encoder, "a dog", None, "cpu")
    assert short.shape == none.shape == (1, 77, encoder.config.hidden_size) and not padded


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("a photo <lora:style_v1:0.8> of a dog", "a photo  of a dog", [("style_v1", 0.8)]),
        ("<lyco:my thing>a cat, <lora:x: -0.5 >", "a cat, ", [("my thing", 1.0), ("x", -0.5)]),
        ("no tags (here:1.2)", "no tags (here:1.2)", []),
        ("keep <hypernet:h:1> this", "keep <hypernet:h:1> this", []),
    ],
)
def test_lora_tags_are_taken_out_of_the_prompt(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("tag", ["<lora:x:strong>", "<lora::0.5>", "<lora:x:0.8:0.4>", "<lora:x:te=0.5>",
                                 "<lora:x:nan>", "<lora:x:inf>"])
def test_malformed_lora_tags_are_errors(tag):
    with pytest.raises(PromptError, match="lora"):
        extract_lora_tags(f"a dog {tag}")
