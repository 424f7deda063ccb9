"""Tiny random-weight CLIP, BLIP and aesthetic predictor with the real classes and layouts.

For tests and benchmarks (nothing is downloaded): each loads through the same path a real
model does (`from_pretrained` on a folder, the predictor's state-dict layout), and is small
enough to train for a few seconds on the shapes captions.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip(size: int = 32):
    """(CLIPModel, CLIPProcessor) of a few thousand parameters at `size` px."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from difftrain.models.tiny_sd import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=32,
    )
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                 crop_size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    return CLIPModel(config), processor


def tiny_blip(words: list[str], folder: Path, size: int = 32):
    """(BlipForConditionalGeneration, BlipProcessor) whose vocabulary is `words`; the vocab file goes in `folder`."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=32,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=size, patch_size=8),
        projection_dim=32)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    return BlipForConditionalGeneration(config), processor


def laion_layout_predictor(width: int) -> torch.nn.Sequential:
    """LAION's improved aesthetic predictor's module layout (Linear/Dropout, no activation), narrower:
    its state dict has the same keys (0, 2, 4, 6, 7) a real one has under `layers.`."""
    return torch.nn.Sequential(torch.nn.Linear(width, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 16),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.1),
                               torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)).eval()
