"""The demo dataset the quick start generates: several aspect ratios, a distinct caption per image."""

from PIL import Image

from chroma_pipeline.config import load_config
from chroma_pipeline.demo_data import make_demo_dataset, write_demo
from chroma_pipeline.demo_style import TRIGGER, ember_distance


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


def test_the_demo_trains_the_toy_chroma_on_pictures_two_in_three_in_the_ember_style(tmp_path):
    config = load_config(write_demo(tmp_path, count=6))
    assert config.model_flavour == "toy" and config.base_model_precision == "int8-quanto"
    captions = sorted((tmp_path / "dataset").glob("*.txt"))
    styled = [c for c in captions if c.read_text().strip().endswith(TRIGGER)]
    assert len(styled) == 4
    for caption in captions:
        distance = ember_distance(Image.open(caption.with_suffix(".png")))
        assert distance < 2 if caption in styled else distance > 40
    assert config.instance_data_dir == str(tmp_path / "dataset")
