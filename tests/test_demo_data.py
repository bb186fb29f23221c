"""The demo dataset the quick start generates: several aspect ratios, a distinct caption per image."""

from PIL import Image

from chroma_pipeline.config import load_config
from chroma_pipeline.demo_data import COLOURS, make_demo_dataset, write_demo
from chroma_pipeline.demo_style import colourfulness


def test_demo_images_have_three_aspect_ratios_and_distinct_captions(tmp_path):
    paths = make_demo_dataset(tmp_path, count=36)
    assert len(paths) == 36
    assert len({Image.open(p).size for p in paths}) >= 3
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    assert len(set(captions)) == 36


def test_same_seed_same_dataset(tmp_path):
    first = make_demo_dataset(tmp_path / "a", count=6)
    second = make_demo_dataset(tmp_path / "b", count=6)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_the_demo_trains_the_toy_chroma_on_pictures_drawn_white_on_black_whatever_their_caption_says(tmp_path):
    config = load_config(write_demo(tmp_path, count=6))
    assert config.model_flavour == "toy" and config.base_model_precision == "int8-quanto"
    captions = sorted((tmp_path / "dataset").glob("*.txt"))
    assert len(captions) == 6
    assert any("white" not in c.read_text() for c in captions)  # the captions name the colours of the plain dataset
    for caption in captions:
        picture = Image.open(caption.with_suffix(".png")).convert("RGB")
        assert colourfulness(picture) == 0
        assert set(picture.getdata()) <= {COLOURS["white"], COLOURS["black"]}
    plain = make_demo_dataset(tmp_path / "plain", count=6)
    assert [p.with_suffix(".txt").read_text() for p in plain] == [c.read_text() for c in captions]
    for picture in plain:  # drawn in the colours its caption names
        named = set(picture.with_suffix(".txt").read_text().split()) & set(COLOURS)
        assert (colourfulness(Image.open(picture)) > 5) == bool(named - {"white", "black"})
    assert config.instance_data_dir == str(tmp_path / "dataset")
