import json
from pathlib import Path

import pytest
from PIL import Image

from difftrain.data.folder import DatasetError, scan_folder


def make_image(path, colour=(200, 20, 20), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_metadata_captions_recursive_and_bad_files_reported(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "sub" / "b.jpg")
    make_image(tmp_path / "c.png")
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"file_name": "a.png", "text": "a red thing"}),
                json.dumps({"file_name": "sub/b.jpg", "text": "another"}),
                json.dumps({"file_name": "c.png", "text": None, "caption": "a null text, a caption"}),
                json.dumps({"file_name": "gone.png", "text": "missing file"}),
                "{not json",
            ]
        )
    )
    scan = scan_folder(tmp_path, progress=False)
    assert scan.caption_source == "metadata"
    assert {r.path.name: r.caption for r in scan.records} == {"a.png": "a red thing", "b.jpg": "another",
                                                             "c.png": "a null text, a caption"}
    reasons = dict(scan.skipped)
    assert reasons["broken.png"] == "empty file (0 bytes)"
    assert "not valid JSON" in dict(scan.notes)["metadata.jsonl line 5"]  # a caption problem: no image lost
    assert any("does not exist" in r for n, r in scan.skipped if n.endswith("gone.png"))
    assert len(scan.skipped) == 2 and len(scan.notes) == 1
    report = "\n".join(scan.report_lines())
    assert "3 usable images" in report and "broken.png" in report


def test_a_bom_keeps_the_first_caption_and_tool_folders_are_not_data(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.jfif")  # Chrome's name for the JPEGs it saves
    make_image(tmp_path / "@eaDir" / "a.png" / "SYNOFILE_THUMB_M.jpg")  # a Synology NAS's thumbnails
    make_image(tmp_path / "__MACOSX" / "a.png")
    make_image(tmp_path / ".thumbnails" / "a.png")
    lines = [json.dumps({"file_name": "a.png", "text": "first"}), json.dumps({"file_name": "b.jfif", "text": "second"})]
    (tmp_path / "metadata.jsonl").write_bytes("\r\n".join(lines).encode("utf-8-sig"))  # as Windows Notepad saves it
    scan = scan_folder(tmp_path, progress=False)
    found = {str(r.path.relative_to(tmp_path)): r.caption for r in scan.records}
    assert found == {"a.png": "first", "b.jfif": "second"}
    assert scan.skipped == []


def test_a_subfolders_metadata_leaves_the_other_images_their_caption_files(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a caption file")
    make_image(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from metadata"}))
    scan = scan_folder(tmp_path, progress=False)
    assert {r.path.name: r.caption for r in scan.records} == {"x.png": "a caption file", "a.png": "from metadata"}
    assert scan.missing_captions == []


def test_txt_captions_and_missing_ones_counted(tmp_path):
    make_image(tmp_path / "one.png")
    make_image(tmp_path / "two.png")
    (tmp_path / "one.txt").write_text("  a caption \n")
    scan = scan_folder(tmp_path, progress=False)
    assert scan.caption_source == "txt"
    assert {r.path.name: r.caption for r in scan.records} == {"one.png": "a caption", "two.png": None}
    assert scan.missing_captions == ["two.png"]
    assert "1 images have no caption" in scan.report_lines()[-1]


def test_no_captions(tmp_path):
    make_image(tmp_path / "x.bmp")
    scan = scan_folder(tmp_path, progress=False)
    assert scan.caption_source == "none" and scan.records[0].caption is None


def test_no_usable_image_fails_at_once_with_the_reason(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"no usable images .* a.png: not an image"):
        scan_folder(tmp_path, progress=False)
    with pytest.raises(DatasetError, match="is not a folder"):
        scan_folder(tmp_path / "absent", progress=False)


def test_metadata_lines_that_are_not_utf8_or_repeat_a_file_are_reported(tmp_path):
    from difftrain.data.folder import scan_folder

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "text": "first"}\n'
        b'{"file_name": "b.png", "text": "caf\xe9"}\n'  # Latin-1, not UTF-8
        b'{"file_name": "a.png", "text": "second"}\n'
    )
    scan = scan_folder(tmp_path, progress=False)
    captions = {r.path.name: r.caption for r in scan.records}
    assert captions == {"a.png": "first", "b.png": None}
    # Notes, not skipped files: no image was left out for them
    assert scan.skipped == []
    reasons = dict(scan.notes)
    assert "not valid UTF-8" in reasons["metadata.jsonl line 2"]
    assert reasons["metadata.jsonl line 3"] == "a.png is listed again; the caption of metadata.jsonl line 1 is kept"
    report = "\n".join(scan.report_lines())
    assert "2 caption problems (no image left out for them):" in report
    assert "line 2" in report and "line 3" in report and "1 images have no caption" in report


def test_a_txt_caption_that_is_not_utf8_is_reported_not_guessed(tmp_path):
    make_image(tmp_path / "one.png")
    make_image(tmp_path / "two.png")
    (tmp_path / "one.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "two.txt").write_bytes("\ufeffa bom caption".encode("utf-8"))  # Windows Notepad's UTF-8
    scan = scan_folder(tmp_path, progress=False)
    assert {r.path.name: r.caption for r in scan.records} == {"one.png": None, "two.png": "a bom caption"}
    assert "not valid UTF-8 (byte 3" in dict(scan.notes)["one.txt"] and scan.skipped == []
    assert scan.missing_captions == ["one.png"]


def test_metadata_csv_captions_are_read_as_datasets_imagefolder_reads_them(tmp_path, monkeypatch):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    make_image(tmp_path / "c.png")
    rows = ['file_name,text,score', 'a.png,"a cat, sitting ""politely""\non a mat",5', f'b.png,{"plain " * 30_000},3',
            'c.png,,1', 'gone.png,missing file,2']
    (tmp_path / "metadata.csv").write_bytes("\r\n".join(rows).encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    scan = scan_folder(tmp_path, progress=False)
    assert scan.caption_source == "metadata"
    ours = {r.path.name: r.caption for r in scan.records}
    # (b's caption is past csv's own 131,072-character cell limit)
    assert ours == {"a.png": 'a cat, sitting "politely"\non a mat', "b.png": "plain " * 30_000, "c.png": ""}
    assert dict(scan.skipped)[str((tmp_path / "gone.png").resolve())] == (
        "listed in metadata.csv line 6 but the file does not exist")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "metadata.csv").write_bytes("\r\n".join(rows[:4]).encode("utf-8-sig"))  # imagefolder needs every file
    theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert {Path(row["image"].filename).name: row["text"] or "" for row in theirs} == ours


def test_metadata_csv_problems_name_the_file(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("name,text\na.png,x\n")
    with pytest.raises(DatasetError, match=r"no usable metadata.jsonl or metadata.csv entries under .*: "
                                           r"metadata.csv: has no 'file_name' column \(its header: name, text\)"):
        scan_folder(tmp_path, progress=False)

    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\na.png,caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(DatasetError, match=r"metadata.csv: not valid UTF-8 \(byte 24"):
        scan_folder(tmp_path, progress=False)
    assert scan_folder(tmp_path, captions="txt", progress=False).records[0].caption is None

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    with pytest.raises(DatasetError, match="holds both metadata.jsonl and metadata.csv; keep one of them"):
        scan_folder(tmp_path, progress=False)
