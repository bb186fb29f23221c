"""The demo dataset the quick start generates: several aspect ratios, a distinct caption per image."""

from PIL import Image

from chroma_pipeline.config import load_config
from chroma_pipeline.demo_data import make_demo_dataset, write_demo


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


def test_demo_config_is_a_valid_tiny_config(tmp_path):
    config = load_config(write_demo(tmp_path, count=3))
    assert config.model_flavour == "tiny" and config.base_model_precision == "int8-quanto"
    assert config.instance_data_dir == str(tmp_path / "dataset")
