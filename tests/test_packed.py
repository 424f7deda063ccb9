import pickle

import pytest

from difftrain.data.packed import PackedLists, PackedStrings


def test_packed_strings_read_back_as_the_list_they_pack():
    items = ["a.png", "", "ünïcödé/猫.jpg", "x" * 10_000, "caf\udce9.jpg", "last"]  # (a Latin-1 file name)
    packed = PackedStrings(items)
    assert len(packed) == 6 and list(packed) == items
    assert packed[2] == items[2] and packed[-1] == "last" and packed[1:3] == items[1:3]
    with pytest.raises(IndexError, match="index 6 out of range for 6 strings"):
        packed[6]
    assert list(pickle.loads(pickle.dumps(packed))) == items  # a spawned worker gets a copy that reads the same
    assert len(PackedStrings([])) == 0 and list(PackedStrings([])) == []


def test_packed_lists_keep_each_records_captions():
    captions = [["a cat", "a small cat"], [], ["with \"quotes\", commas\nand a newline"], ["🐈", "\ud800"]]
    packed = PackedLists(captions)
    assert list(packed) == captions and packed[0] == captions[0] and packed[-1] == ["🐈", "\ud800"]
    assert packed[1:3] == captions[1:3]
    assert PackedLists([("a", "b")])[0] == ["a", "b"]  # tuples in, lists out
