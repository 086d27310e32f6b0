import math

import pytest
from PIL import Image

from tests.conftest import noise_image
from visionleaf.tools import Observation, ToolCall, ToolContext, get_tool, map_box, run_tool
from visionleaf.tools.crop import model_size

MODEL, ORIGINAL = (500, 400), (2000, 1600)  # scale 4 in both directions

# (bbox_2d in model space, expected box in original pixels)
VALID = [
    # plain box: scaled by original / model
    ([100, 100, 200, 150], (400, 400, 800, 600)),
    # float coordinates are kept exactly
    ([10.5, 20.25, 60.5, 70.25], (42, 81, 242, 281)),
    # partly outside: clamped to the image first
    ([-50, -10, 100, 100], (0, 0, 400, 400)),
    ([450, 350, 900, 900], (1800, 1400, 2000, 1600)),
    # 10x10 box: enlarged to 28x28 around its centre (105, 105)
    ([100, 100, 110, 110], (364, 364, 476, 476)),
    # small box at the corner: enlarged then shifted back inside
    ([0, 0, 5, 5], (0, 0, 112, 112)),
    ([495, 395, 500, 400], (1888, 1488, 2000, 1600)),
    # very thin, long box: enlarged to 28 px high (height < 28 rule applies first)
    ([0, 100, 500, 101], (0, 4 * (100.5 - 14), 2000, 4 * (100.5 + 14))),
]


@pytest.mark.parametrize(("bbox", "expected"), VALID)
def test_map_box_valid(bbox, expected):
    assert map_box(bbox, MODEL, ORIGINAL) == pytest.approx(expected)


def test_aspect_ratio_is_capped():
    # 5000 px wide, 28 px high in model space: the height is widened to 50 = 5000 / 100
    box = map_box([0, 100, 5000, 101], (5000, 400), (5000, 400))
    width, height = box[2] - box[0], box[3] - box[1]
    assert width == 5000 and height == pytest.approx(50)
    assert width / height <= 100 + 1e-9


def test_identity_when_sizes_match():
    assert map_box([1, 2, 300, 200], (500, 400), (500, 400)) == (1, 2, 300, 200)


# (bbox_2d, words the error message must contain)
INVALID = [
    ([1, 2, 3], "4 numbers"),  # wrong arity
    ([1, 2, 3, 4, 5], "4 numbers"),
    ("1,2,3,4", "list of 4 numbers"),  # a string is not a box
    (None, "list of 4 numbers"),
    ([1, "a", 3, 4], "numbers only"),  # non-numeric
    ([True, 1, 3, 4], "numbers only"),  # booleans are not coordinates
    ([math.nan, 1, 3, 4], "finite"),
    ([1, 1, math.inf, 4], "finite"),
    ([10, 1, 5, 4], "x1 < x2"),  # inverted
    ([1, 10, 5, 10], "y1 < y2"),  # zero height
    ([600, 500, 700, 600], "outside"),  # entirely outside the 500x400 image
]


@pytest.mark.parametrize(("bbox", "words"), INVALID)
def test_map_box_invalid(bbox, words):
    with pytest.raises(ValueError, match=words):
        map_box(bbox, MODEL, ORIGINAL)


def test_map_box_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        map_box([1, 1, 5, 5], (0, 10), (10, 10))


def _context(original: Image.Image, max_pixels: int = 28 * 28 * 64) -> ToolContext:
    size = model_size(original.size, 28 * 28 * 4, max_pixels)
    return ToolContext(
        original_image=original, model_size=size, crop_min_pixels=28 * 28 * 4, crop_max_pixels=max_pixels
    )


def test_zoom_crops_the_original_at_full_resolution():
    # A 2000x1500 original shown to the model at ~ 252x196; a red square sits at (1000..1040, 700..740).
    original = Image.new("RGB", (2000, 1500), "white")
    original.paste((255, 0, 0), (1000, 700, 1040, 740))
    context = _context(original)
    sx, sy = original.width / context.model_size[0], original.height / context.model_size[1]
    bbox = [1000 / sx, 700 / sy, 1040 / sx, 740 / sy]  # the square in model coordinates
    obs = run_tool(ToolCall("image_zoom_in_tool", {"bbox_2d": bbox, "label": "square"}), context)
    assert obs.ok and obs.text == "" and len(obs.images) == 1
    crop = obs.images[0]
    # The box is enlarged to 28 model px around the square: the square is in the middle of the crop.
    assert obs.box is not None
    assert obs.box[2] - obs.box[0] == pytest.approx(28 * sx)
    assert crop.getpixel((crop.width // 2, crop.height // 2)) == (255, 0, 0)
    # Whole visual tokens within the pixel budget.
    assert crop.width % 28 == 0 and crop.height % 28 == 0
    assert 28 * 28 * 4 <= crop.width * crop.height <= 28 * 28 * 64


@pytest.mark.parametrize(
    "arguments",
    [
        {},  # missing bbox_2d
        {"bbox_2d": [1, 2]},
        {"bbox_2d": [5, 5, 1, 1]},
        {"bbox_2d": ["a", 1, 2, 3]},
        {"bbox_2d": [float("nan"), 1, 2, 3]},
    ],
)
def test_zoom_errors_become_observations(arguments):
    obs = run_tool(ToolCall("image_zoom_in_tool", arguments), _context(noise_image(300, 200)))
    assert not obs.ok and obs.text.startswith("Error:") and obs.images == ()


def test_unknown_and_disallowed_tools_are_error_observations():
    context = _context(noise_image(300, 200))
    obs = run_tool(ToolCall("magic_tool", {}), context)
    assert not obs.ok and "unknown tool 'magic_tool'" in obs.text and "image_zoom_in_tool" in obs.text
    obs = run_tool(ToolCall("image_rotate_tool", {"angle": 90}), context, allowed=("image_zoom_in_tool",))
    assert not obs.ok and obs.text.startswith("Error: unknown tool")


def test_a_crashing_user_tool_never_crashes_the_rollout():
    from visionleaf.tools import TOOL_REGISTRY, register_tool

    @register_tool("test_broken_tool", "always fails", {"type": "object", "properties": {}})
    def broken(arguments, context) -> Observation:
        raise RuntimeError("boom")

    try:
        obs = run_tool(ToolCall("test_broken_tool", {}), _context(noise_image(64, 64)))
        assert not obs.ok and obs.text == "Error: tool 'test_broken_tool' failed: RuntimeError: boom"
    finally:
        TOOL_REGISTRY.unregister("test_broken_tool")


def test_registry_getter_lists_names_on_a_miss():
    with pytest.raises(KeyError, match="image_zoom_in_tool"):
        get_tool("nope")
    schema = get_tool("image_zoom_in_tool").schema()
    assert schema["function"]["parameters"]["required"] == ["bbox_2d"]


@pytest.mark.parametrize(("angle", "size"), [(90, (100, 200)), (180, (200, 100)), (270, (100, 200)), (-90, (100, 200))])
def test_rotate_right_angles(angle, size):
    original = Image.new("RGB", (200, 100), "white")
    original.paste((0, 0, 255), (0, 0, 20, 20))  # blue in the top-left corner
    context = ToolContext(original_image=original, model_size=(196, 112), crop_min_pixels=1, crop_max_pixels=10**7)
    obs = run_tool(ToolCall("image_rotate_tool", {"angle": angle}), context)
    assert obs.ok
    image = obs.images[0]
    # Resized to multiples of 28 with the aspect ratio of the rotated image.
    assert (image.width > image.height) == (size[0] > size[1])
    corners = {
        90: (5, image.height - 5),  # counter-clockwise: top-left goes to bottom-left
        180: (image.width - 5, image.height - 5),
        270: (image.width - 5, 5),
        -90: (image.width - 5, 5),
    }
    assert image.getpixel(corners[angle]) == (0, 0, 255)


def test_rotate_arbitrary_angle_and_bad_angle():
    context = ToolContext(original_image=noise_image(100, 100), model_size=(112, 112))
    assert run_tool(ToolCall("image_rotate_tool", {"angle": 45}), context).ok
    for bad in ("ninety", None, float("inf"), True):
        obs = run_tool(ToolCall("image_rotate_tool", {"angle": bad}), context)
        assert not obs.ok and obs.text.startswith("Error: angle")
