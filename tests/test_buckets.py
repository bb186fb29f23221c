"""Aspect-bucket arithmetic: sides on the 64-pixel grid, aspect ratio kept, area near the target."""

import pytest
from PIL import Image

from chroma_pipeline.buckets import bucket_for, fit_to_bucket


@pytest.mark.parametrize(
    ("size", "resolution", "resolution_type", "bucket"),
    [
        ((1024, 1024), 1024, "pixel_area", (1024, 1024)),
        ((3000, 2000), 1024, "pixel_area", (1280, 832)),  # sqrt(1024^2 * 1.5) = 1254 -> 1280; /1.5 -> 832
        ((2000, 3000), 1024, "pixel_area", (832, 1280)),
        ((3000, 2000), 512, "pixel", (768, 512)),  # shorter edge 512, longer 512 * 1.5
        ((2000, 3000), 512, "pixel", (512, 768)),
        ((4000, 3000), 1.0, "area", (1152, 896)),  # 1 MP at 4:3 = 1181 x 888, snapped to 64
        ((640, 480), 256, "pixel_area", (320, 192)),  # 295 x 222: the 64 grid is coarse at small sizes
    ],
)
def test_bucket_sizes(size, resolution, resolution_type, bucket):
    assert bucket_for(*size, resolution, resolution_type) == bucket


@pytest.mark.parametrize("aspect", [0.25, 0.5, 0.66, 0.8, 1.0, 1.33, 1.78, 2.4, 4.0])
@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_bucket_sides_are_multiples_of_64_and_area_stays_close(aspect, resolution):
    width, height = bucket_for(round(1000 * aspect), 1000, resolution, "pixel_area")
    assert width % 64 == 0 and height % 64 == 0
    assert abs(width * height / resolution**2 - 1) < 0.35


def test_fit_to_bucket_covers_then_center_crops():
    image = Image.new("RGB", (300, 100), "red")
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue strip on the far left, cropped away
    fitted = fit_to_bucket(image, (128, 128))
    assert fitted.size == (128, 128)
    assert fitted.getpixel((0, 64)) == (255, 0, 0)


def _strip_image():
    """300x100: red on the left third, green in the middle, blue on the right."""
    image = Image.new("RGB", (300, 100), "green")
    image.paste((255, 0, 0), (0, 0, 100, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    return image


def test_crop_styles_keep_the_centre_the_corner_or_a_reproducible_random_window():
    image = _strip_image()
    assert fit_to_bucket(image, (64, 64), crop_style="center").getpixel((32, 32)) == (0, 128, 0)
    assert fit_to_bucket(image, (64, 64), crop_style="corner").getpixel((32, 32)) == (255, 0, 0)
    randoms = {fit_to_bucket(image, (64, 64), crop_style="random", seed=f"image-{i}").tobytes() for i in range(8)}
    assert len(randoms) > 1  # different images get different windows...
    again = fit_to_bucket(image, (64, 64), crop_style="random", seed="image-3")
    assert again.tobytes() == fit_to_bucket(image, (64, 64), crop_style="random", seed="image-3").tobytes()  # ...stable


def test_no_crop_stretches_the_whole_image_into_the_bucket():
    stretched = fit_to_bucket(_strip_image(), (192, 64), crop=False)
    assert stretched.size == (192, 64)
    assert stretched.getpixel((5, 32))[0] > 200 and stretched.getpixel((186, 32))[2] > 200  # both ends kept


def test_square_crop_aspect_puts_everything_in_the_square_bucket():
    assert bucket_for(3000, 2000, 1024, "pixel_area", crop_aspect="square") == (1024, 1024)
    assert bucket_for(2000, 3000, 512, "pixel", crop_aspect="square") == (512, 512)


@pytest.mark.parametrize("resolution_type, resolution", [("pixel", 576), ("pixel_area", 576), ("pixel_area", 128),
                                                         ("area", 1.0)])
@pytest.mark.parametrize("size", [(300, 200), (1500, 1000), (640, 427), (1024, 683), (5000, 1000)])
def test_a_portrait_gets_its_landscape_twins_bucket_turned(resolution_type, resolution, size):
    landscape = bucket_for(*size, resolution, resolution_type)
    assert bucket_for(size[1], size[0], resolution, resolution_type) == (landscape[1], landscape[0])


def test_prefetched_batches_arrive_in_the_order_drawn_and_a_loading_error_reaches_the_loop():
    from chroma_pipeline.batches import Prefetched

    def draws():
        yield from range(5)
        raise OSError("latent shard unreadable")

    loader = Prefetched(draws())
    assert [next(loader) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(OSError, match="unreadable"):
        next(loader)
    loader.close()
