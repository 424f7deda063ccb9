"""Prompts the way AUTOMATIC1111's web UI reads them, so a prompt copied from it means the same here.

Four pieces, each a port of the web UI's behaviour (modules/prompt_parser.py,
modules/sd_hijack_clip.py, modules/extra_networks.py):

* `parse_attention`: `(word)`, `[word]`, `(word:1.5)`, escapes and `BREAK` -> (text, weight) runs.
* `tokenize_weighted`: per-token weights in chunks of 75 tokens, each framed to 77 as CLIP was
  trained, so a prompt is never cut off at 77 tokens.
* `encode_prompt` / `encode_pair`: each chunk through the text encoder, weights applied to its
  output, chunks concatenated (a UNet's cross-attention takes any sequence length).
* `extract_lora_tags`: `<lora:name:0.8>` tags out of the prompt text.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import NamedTuple

import torch

from difftrain.errors import DifftrainError

log = logging.getLogger(__name__)

BREAK = ("BREAK", -1.0)
# bracket -> the factor it applies to everything inside it
BRACKET_FACTORS = {"(": 1.1, "[": 1 / 1.1}
CLOSING = {")": "(", "]": "["}
# How far back (in tokens) a chunk may end early at a comma instead of splitting a phrase: the
# web UI's "comma padding backtrack" setting and its default.
COMMA_BACKTRACK = 20
LORA_TAG = re.compile(r"<(lora|lyco):([^>]+)>")

# Alternatives in the web UI's order, which decides ties: escapes first (a lone backslash is
# dropped), then brackets, a weighted close `:1.5)`, plain text, and a colon that is just text.
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptError(DifftrainError):
    pass


class Chunk(NamedTuple):
    """One text-encoder input: BOS, up to 75 prompt tokens, EOS, padding (77 ids, 77 weights)."""

    ids: list[int]
    weights: list[float]


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; a BREAK is the ("BREAK", -1.0) marker.

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight, is_break]
    opened: dict[str, list[int]] = {bracket: [] for bracket in BRACKET_FACTORS}

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            # The web UI scales BREAK's -1 too, turning "(a BREAK b)" into the word "BREAK"
            # with weight -1.1; a break inside brackets stays a break here.
            if not run[2]:
                run[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0, False])
        elif piece in opened:
            opened[piece].append(len(runs))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _weight(weight, text))
        elif piece in CLOSING and opened[CLOSING[piece]]:
            scale(opened[CLOSING[piece]].pop(), BRACKET_FACTORS[CLOSING[piece]])
        else:  # plain text, and brackets or a `:1.5)` with nothing open to close
            for i, part in enumerate(_BREAK_WORD.split(piece)):
                if i:
                    runs.append([*BREAK, True])
                runs.append([part, 1.0, False])
    # An unclosed bracket applies to the rest of the prompt (round ones first, as the web UI does).
    for bracket, starts in opened.items():
        for start in starts:
            scale(start, BRACKET_FACTORS[bracket])
    if not runs:
        runs = [["", 1.0, False]]

    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        last = merged[-1]
        if not run[2] and not last[2] and run[1] == last[1]:
            last[0] += run[0]
        else:
            merged.append(run)
    return [BREAK if is_break else (piece, weight) for piece, weight, is_break in merged]


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise PromptError(f"prompt {text!r}: {number!r} is not a weight; write it as (words:1.2)") from None


def _special_ids(tokenizer, max_length: int | None = None) -> tuple[int, int, int, int]:
    """(chunk length, BOS, EOS, padding id) of a CLIP-style tokenizer, for chunks of `max_length` ids
    (default the tokenizer's model_max_length)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise PromptError(f"{type(tokenizer).__name__} has no BOS/EOS token; weighted prompts need a CLIP tokenizer")
    max_length = max_length or tokenizer.model_max_length
    # An unset model_max_length is a huge sentinel (1e30); chunks need the encoder's real window.
    if not 3 <= max_length <= 4096:
        raise PromptError(
            f"tokenizer model_max_length is {max_length}; set it to the text encoder's length (77 for CLIP)"
        )
    # SD 1.x pads with EOS, SD 2.x with its own pad token: whichever the model was trained with.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return max_length - 2, bos, eos, pad


def tokenize_weighted(
    tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK, max_length: int | None = None
) -> list[Chunk]:
    """A prompt as 77-token chunks with per-token weights, split the way the web UI splits it.

    Chunks are `max_length` ids long when given (a model trained on a shorter text context),
    else the tokenizer's model_max_length.

    A chunk holds 75 prompt tokens. When one fills up mid-phrase and a comma lies within the last
    `comma_backtrack` tokens, the chunk ends after that comma and the phrase moves to the next
    chunk whole (0 turns this off). `BREAK` ends the chunk where it stands. The empty prompt is
    one chunk of BOS, EOS and padding.
    """
    size, bos, eos, pad = _special_ids(tokenizer, max_length)
    parsed = parse_attention(text)
    pieces = tokenizer([piece for piece, _ in parsed], add_special_tokens=False, truncation=False, verbose=False)
    comma = tokenizer.get_vocab().get(",</w>")  # None for a non-CLIP vocabulary: no backtracking
    runs = _embedding_runs(tokenizer)

    chunks: list[Chunk] = []
    current: list[tuple[int, float]] = []
    last_comma = -1

    def close() -> None:
        nonlocal last_comma
        filler = size - len(current)
        chunks.append(
            Chunk(
                [bos, *(token for token, _ in current), eos] + [pad] * filler,
                [1.0, *(weight for _, weight in current), 1.0] + [1.0] * filler,
            )
        )
        current.clear()
        last_comma = -1

    for (piece, weight), tokens in zip(parsed, pieces["input_ids"]):
        if (piece, weight) == BREAK:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(current)
            elif comma_backtrack and len(current) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                moved = current[last_comma + 1 :]
                del current[last_comma + 1 :]
                close()
                current.extend(moved)
            if len(current) == size or (current and len(current) + runs.get(token, 1) > size):
                close()  # (a multi-vector embedding moves to the next chunk whole, as in the web UI)
            current.append((token, weight))
    if current or not chunks:
        close()
    return chunks


def _embedding_runs(tokenizer) -> dict[int, int]:
    """The first token of each multi-vector embedding and its number of vectors: diffusers loads one as
    the tokens `<tok>`, `<tok>_1`, `<tok>_2`, ... which a prompt then holds side by side."""
    added = tokenizer.get_added_vocab()
    runs = {}
    for text, token in added.items():
        count = 1
        while f"{text}_{count}" in added:
            count += 1
        if count > 1:
            runs[token] = count
    return runs


def weight_embeddings(z: torch.Tensor, weights: torch.Tensor, restore_mean: bool = True) -> torch.Tensor:
    """Scale each token's vector by its weight: z [chunks, tokens, dim], weights [chunks, tokens].

    The web UI then rescales each chunk back to its original mean: not principled, but it keeps
    heavy weights from pushing the whole conditioning off the scale the UNet knows.
    """
    weighted = z * weights.to(z.dtype).unsqueeze(-1)
    if not restore_mean:
        return weighted
    original = z.mean(dim=(1, 2), keepdim=True)
    new = weighted.mean(dim=(1, 2), keepdim=True)
    # A layer norm without bias (clip_skip through an untrained norm) gives a mean of exactly 0:
    # there is nothing to restore then, and 0 / 0 would turn the whole chunk into NaN.
    return weighted * torch.where(new == 0, torch.ones_like(new), original / new)


def _hidden_states(text_encoder, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The encoder's last hidden state, or with clip_skip > 1 the one that many layers from the end
    through the final layer norm (the web UI's "Clip skip"; 2 is what NovelAI-lineage models expect)."""
    layers = text_encoder.config.num_hidden_layers
    if not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
        raise PromptError(f"clip_skip is {clip_skip!r}; this text encoder allows 1 to {layers} (1 = last layer)")
    if ids.shape[1] > text_encoder.config.max_position_embeddings:
        raise PromptError(
            f"chunks of {ids.shape[1]} tokens but the text encoder takes at most "
            f"{text_encoder.config.max_position_embeddings}; the tokenizer's model_max_length does not match it"
        )
    if clip_skip > 1 and is_open_clip(text_encoder):
        # SD 2.x's encoder already stops at OpenCLIP's penultimate block, and AUTOMATIC1111 does not apply
        # "Clip skip" to it: A1111's own images of SD 2 models (their PNGs say "Clip skip: 2" when the setting
        # is on) and its API's override_settings draw as with 1.
        _clip_skip_ignored(clip_skip)
        clip_skip = 1
    if clip_skip == 1:
        return text_encoder(input_ids=ids).last_hidden_state
    output = text_encoder(input_ids=ids, output_hidden_states=True)
    return _final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])


@functools.cache  # said once a process (for each value), not at every prompt a server encodes
def _clip_skip_ignored(clip_skip: int) -> None:
    log.warning("clip skip %d ignored: SD 2.x's OpenCLIP text encoder takes none, as in AUTOMATIC1111", clip_skip)


def is_open_clip(text_encoder) -> bool:
    """SD 2.x's OpenCLIP encoder, told from SD 1.x's OpenAI CLIP by its activation (gelu, not quick_gelu)."""
    return getattr(text_encoder.config, "hidden_act", None) == "gelu"


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5's CLIPTextModel holds it directly; older ones and the projection models
    # (SDXL's second encoder) hold it under text_model.
    for owner in (text_encoder, getattr(text_encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None)
        if isinstance(norm, torch.nn.Module):
            return norm
    raise PromptError(f"{type(text_encoder).__name__} has no final_layer_norm; clip_skip > 1 needs a CLIP text encoder")


def _encode_chunks(text_encoder, chunks: list[Chunk], device, clip_skip: int) -> torch.Tensor:
    ids = torch.tensor([chunk.ids for chunk in chunks], device=device)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device)
    z = _hidden_states(text_encoder, ids, clip_skip)
    # Weighting in float32: a half-precision mean over a whole chunk loses the digits it restores.
    z = weight_embeddings(z.float(), weights).to(z.dtype)
    return z.reshape(1, -1, z.shape[-1])


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, text: str, device, clip_skip: int = 1) -> torch.Tensor:
    """Weighted conditioning [1, 77 * chunks, hidden]; the text encoder must already be on `device`."""
    return _encode_chunks(text_encoder, tokenize_weighted(tokenizer, text), device, clip_skip)


@torch.no_grad()
def encode_pair(
    tokenizer, text_encoder, prompt: str, negative: str | None, device, clip_skip: int = 1,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(positive, negative, padded): conditioning of equal length, ready to stack for classifier-free guidance.

    The side with fewer chunks is padded with empty-prompt chunks, as the web UI does with its "Pad conds"
    option (by default it runs the two sides as separate UNet calls; diffusers' pipelines take one shape);
    `padded` says whether it was, which A1111's infotext records. A prompt that fits one chunk gives
    exactly what training's plain tokenizer call gives.
    """
    (positive, negative_z), padded = encode_texts(tokenizer, text_encoder, [prompt, negative or ""], device, clip_skip,
                                                  max_length)
    return positive, negative_z, padded


@torch.no_grad()
def encode_texts(
    tokenizer, text_encoder, texts: list[str], device, clip_skip: int = 1, max_length: int | None = None,
    pad: bool = True,
) -> tuple[list[torch.Tensor], bool]:
    """Each text's conditioning [1, 77 * chunks, hidden] and whether any was padded: with `pad`, all padded with
    empty-prompt chunks to the most chunks any has (encode_pair's rule); else each at its own length."""
    unpadded = [tokenize_weighted(tokenizer, text, max_length=max_length) for text in texts]
    count = max(map(len, unpadded)) if pad else 0
    empty = tokenize_weighted(tokenizer, "", max_length=max_length)[0]
    sides = [side + [empty] * (count - len(side)) for side in unpadded]
    # One encoder call for all: each chunk is weighted on its own, so batching changes nothing.
    together = _encode_chunks(text_encoder, [chunk for side in sides for chunk in side], device, clip_skip)
    lengths = [sum(len(chunk.ids) for chunk in side) for side in sides]
    return list(together.split(lengths, dim=1)), pad and len({len(side) for side in unpadded}) > 1


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove `<lora:name>` / `<lora:name:weight>` tags (`<lyco:...>` alike) from a prompt.

    Returns the prompt with each tag replaced by nothing, as the web UI does, and the
    (name, weight) pairs in prompt order; weight defaults to 1.0. Other `<...:...>` tags stay.
    """
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        name, *rest = (item.strip() for item in match.group(2).split(":"))
        if not name or len(rest) > 1 or any("=" in item for item in rest):
            raise PromptError(
                f"{match.group(0)!r}: write <{match.group(1)}:name> or <{match.group(1)}:name:weight>; "
                "separate text-encoder and UNet weights are not supported"
            )
        try:
            weight = float(rest[0]) if rest else 1.0
        except ValueError:
            raise PromptError(f"{match.group(0)!r}: {rest[0]!r} is not a number") from None
        if not math.isfinite(weight):  # (float() reads "nan" and "inf": the drawing came out black)
            raise PromptError(f"{match.group(0)!r}: give a finite weight")
        found.append((name, weight))
        return ""

    return LORA_TAG.sub(take, prompt), found
