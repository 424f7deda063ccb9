"""What a message about a data source calls each of its settings.

A run sets them as config keys (`data.path`, `data.split`); `data build/curate/check` take the same settings
as a PATH argument and flags (`--split`); eval takes a reference as `--reference` or `eval.reference`. The data
layer's messages name whichever the caller hands `open_source`, so each user reads the name they typed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SettingNames:
    path: str = "data.path"
    source: str = "data.source"
    captions: str = "data.captions"
    image_key: str = "data.image_key"  # jsonl: the key of the image path
    caption_key: str = "data.caption_key"
    image_column: str = "data.image_column"  # hf
    caption_column: str = "data.caption_column"
    split: str = "data.split"
    hf_config: str = "data.hf_config"
    revision: str = "data.revision"
    streaming: str = "data.streaming: true"  # as it is turned on
    without_captions: str = "data.captions: none"  # what reads the data without its captions
    without_streaming: str = "set data.streaming: false"

    def given(self, setting: str, value: object) -> str:
        """The setting with its value as the user wrote it: `data.split = 'x'`, or `--split 'x'`."""
        name = getattr(self, setting)
        return f"{name} {value!r}" if name.startswith("-") else f"{name} = {value!r}"


DATA_KEYS = SettingNames()

# `difftrain data build|curate|check PATH --source ... --image-key ... --caption-key ... --split ...`
COMMAND_ARGUMENTS = SettingNames(
    path="PATH", source="--source", captions="--captions", image_key="--image-key", caption_key="--caption-key",
    image_column="--image-key", caption_column="--caption-key", split="--split", hf_config="--hf-config",
    revision="--revision", streaming="--streaming", without_captions="--caption-key ''",
    without_streaming="leave --streaming out")


def reference_names(setting: str) -> SettingNames:
    """Those of an evaluation reference given as `setting` (`--reference`, `eval.reference`): its key options are
    named after it (`--reference-image-key`, `eval.reference_image_key`)."""
    if setting == DATA_KEYS.path:
        return DATA_KEYS
    joint = "-" if setting.startswith("-") else "_"
    image, caption = f"{setting}{joint}image{joint}key", f"{setting}{joint}caption{joint}key"
    return replace(DATA_KEYS, path=setting, image_key=image, caption_key=caption, image_column=image,
                   caption_column=caption,
                   without_captions=f"{caption} ''" if setting.startswith("-") else f"{caption}: ''")
