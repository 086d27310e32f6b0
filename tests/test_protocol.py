import pytest

from tests.conftest import noise_image
from visionleaf.protocol import (
    IM_END,
    build_messages,
    image_pixel_budget,
    observation_text,
    observation_texts,
    render_prompt,
    split_assistant_turns,
    template_messages,
    tokenize_trajectory,
)
from visionleaf.tools import ToolCall, ToolContext, get_tool, run_tool
from visionleaf.tools.crop import model_size

TURN_1 = (
    "<think>The cup is small; zoom in.</think>"
    '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 90]}}</tool_call>'
)
TURN_2 = "<think>It is red.</think><answer>A</answer>"


@pytest.mark.parametrize("processor_name", ["bpe_processor", "qwen_processor"])
def test_trajectory_tokenises_like_the_processor(processor_name, request):
    processor = request.getfixturevalue(processor_name)
    original = noise_image(2000, 1500)
    messages = build_messages("What colour is the cup?\n(A) red\n(B) blue", [get_tool("image_zoom_in_tool")])
    min_pixels, max_pixels = image_pixel_budget(processor.image_processor)
    context = ToolContext(original, model_size(original.size, min_pixels, max_pixels), min_pixels, max_pixels)
    obs = run_tool(ToolCall("image_zoom_in_tool", {"bbox_2d": [10, 20, 100, 90]}), context)
    assert obs.ok

    trajectory = tokenize_trajectory(
        processor,
        render_prompt(processor, messages),
        [original],
        [(TURN_1 + IM_END, obs.images, obs.text), (TURN_2 + IM_END, None, "")],
    )

    # The processor on the whole conversation, rendered by the chat template.
    tool_turn = [
        {"type": "text", "text": "<tool_response>"},
        {"type": "image"},
        {"type": "text", "text": "</tool_response>"},
    ]
    conversation = [
        *template_messages(messages),
        {"role": "assistant", "content": TURN_1},
        {"role": "user", "content": tool_turn},
        {"role": "assistant", "content": TURN_2},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    assert text.endswith(IM_END + "\n")  # the template closes the last turn with a newline the model never generates
    expected = processor(text=[text[:-1]], images=[original, *obs.images], return_tensors="pt")["input_ids"][0]
    assert trajectory.prompt_ids + trajectory.response_ids == expected.tolist()
    assert trajectory.images == [original, *obs.images]

    # The mask is 1 exactly on the two model turns and 0 on the observation in between.
    tokenizer = processor.tokenizer
    n1 = len(tokenizer.encode(TURN_1 + IM_END, add_special_tokens=False))
    n2 = len(tokenizer.encode(TURN_2 + IM_END, add_special_tokens=False))
    n_obs = len(trajectory.response_ids) - n1 - n2
    assert trajectory.response_mask == [1] * n1 + [0] * n_obs + [1] * n2
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    observation_ids = trajectory.response_ids[n1 : n1 + n_obs]
    assert observation_ids.count(image_pad) > 0  # the crop's visual tokens are observation tokens
    assert image_pad not in [t for t, m in zip(trajectory.response_ids, trajectory.response_mask, strict=True) if m]


def test_system_prompt_lists_tool_schemas_and_format():
    messages = build_messages("Q?", [get_tool("image_zoom_in_tool"), get_tool("image_rotate_tool")])
    system, user = messages
    assert '"name": "image_zoom_in_tool"' in system["content"] and '"name": "image_rotate_tool"' in system["content"]
    assert "<tools>" in system["content"] and "</tools>" in system["content"]
    assert user["content"].startswith("<image>\nQ?") and "<answer>" in user["content"]


def test_split_turns_with_and_without_special_tokens():
    with_special = TURN_1 + IM_END + observation_text("", 1) + TURN_2 + IM_END
    without_special = TURN_1 + "\nuser\n<tool_response></tool_response>\nassistant\n" + TURN_2
    assert split_assistant_turns(with_special) == [TURN_1, TURN_2 + IM_END]
    assert split_assistant_turns(without_special) == [TURN_1, TURN_2]
    assert split_assistant_turns(TURN_2) == [TURN_2]
    assert observation_texts(TURN_1 + observation_text("Error: bad box") + TURN_2) == ["Error: bad box"]
