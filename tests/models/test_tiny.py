import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import noise_image
from visionleaf import compat
from visionleaf.models import tiny


def test_reloads_offline_and_runs_a_forward_pass(tiny_model_dir):
    # A fresh interpreter with the hub disabled: nothing may be fetched.
    code = (
        "import sys, torch; from visionleaf.models.tiny import load; from tests.conftest import noise_image\n"
        "model, processor = load(sys.argv[1])\n"
        "text = processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}, "
        "{'type': 'text', 'text': 'hi'}]}], add_generation_prompt=True, tokenize=False)\n"
        "batch = processor(text=[text], images=[noise_image(300, 200)], return_tensors='pt')\n"
        "with torch.no_grad(): logits = model(**batch).logits\n"
        "assert logits.shape[-1] == model.config.text_config.vocab_size, logits.shape\n"
        "assert torch.isfinite(logits).all()\n"
        "print('ok', sum(p.numel() for p in model.parameters()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
    n_params = int(result.stdout.split()[1])
    assert n_params < 2_000_000  # tiny: 2 text layers of hidden 128, vision depth 2


def test_config_matches_the_tokenizer(tiny_model_dir):
    model, processor = tiny.load(tiny_model_dir)
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 128
    assert model.config.vision_config.depth == 2
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_qwen_vocabulary_has_qwen25_ids(qwen_processor):
    tokenizer = qwen_processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.convert_tokens_to_ids("<tool_call>") == 151657
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]  # Qwen2.5's own ids
    # <tool_call> survives skipping special tokens, as in Qwen2.5; chat markers do not.
    ids = tokenizer.encode("<|im_start|>x<tool_call>y</tool_call><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x<tool_call>y</tool_call>"


def test_qwen_model_builds_with_real_ids(qwen_processor):
    model = tiny.build_model(qwen_processor.tokenizer)
    assert model.config.image_token_id == 151655
    assert model.config.text_config.vocab_size >= 151665
    batch = qwen_processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>hi"],
        images=[noise_image(56, 56)],
        return_tensors="pt",
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_bpe_tokenizer_is_deterministic():
    a, b = tiny.build_tokenizer("bpe"), tiny.build_tokenizer("bpe")
    text = '<think>zoom</think><tool_call>{"name": "image_zoom_in_tool"}</tool_call>'
    assert a.get_vocab() == b.get_vocab() and a.encode(text) == b.encode(text)
    with pytest.raises(ValueError, match="'bpe' or 'qwen'"):
        tiny.build_tokenizer("gpt2")  # type: ignore[arg-type]


def test_cli_builds_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "visionleaf.models.tiny", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "processor_config.json").exists()


def test_torchvision_shim_only_when_torchvision_is_unusable(monkeypatch):
    from transformers.models.auto import video_processing_auto

    if compat.torchvision_usable():
        pytest.skip("torchvision works here: the shim must not apply")  # GPU images ship torchvision
    assert compat.apply_torchvision_shim() is True
    assert video_processing_auto.AutoVideoProcessor.from_pretrained("x").merge_size == 2
    with pytest.raises(NotImplementedError, match="videos need torchvision"):
        compat.ImageOnlyVideoProcessor()(videos=[])
    monkeypatch.setattr(compat, "torchvision_usable", lambda: True)
    assert compat.apply_torchvision_shim() is False
