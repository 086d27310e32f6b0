"""Opening an engine from a checkpoint folder or a server URL (the command lines of eval and data share it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

from visionleaf.engines.base import Engine


def load_model(path: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """A Qwen2.5-VL-style checkpoint and its processor (offline), on ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visionleaf.compat import apply_torchvision_shim

    apply_torchvision_shim()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    return cast(Any, model).to(device).eval(), AutoProcessor.from_pretrained(path)


def model_vocab_size(path: str) -> int | None:
    """The checkpoint's output-embedding rows (its language model's ``vocab_size``): the rows past the
    tokenizer's vocabulary are padding no engine may sample. None for a folder without a model config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None  # a processor-only folder: only the vision tokens are banned
    text = getattr(config, "text_config", None) or config
    size = getattr(text, "vocab_size", None)
    return int(size) if size is not None else None


def open_engine(
    model: str | None = None,
    server: Sequence[str] = (),
    processor: str | None = None,
    backend: Literal["vllm", "sglang"] = "vllm",
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[Engine, Any, Any, str]:
    """``(engine, processor, model or None, name)``: an in-process :class:`~visionleaf.engines.hf.HFEngine`
    over the checkpoint at ``model`` (it batches the calls of concurrent callers itself), or a
    :class:`~visionleaf.engines.server.ServerEngine` over ``server`` URLs with the processor at ``processor``.
    ``name`` is the resolved folder, for run configs."""
    if model:
        from visionleaf.engines.hf import HFEngine

        hf_model, hf_processor = load_model(model, device, dtype)
        return HFEngine(hf_model, hf_processor), hf_processor, hf_model, str(Path(model).resolve())
    if not server or not processor:
        raise ValueError("give a checkpoint folder (--model DIR), or server URLs with --processor DIR")
    from transformers import AutoProcessor

    from visionleaf.compat import apply_torchvision_shim
    from visionleaf.engines.server import ServerConfig, ServerEngine

    apply_torchvision_shim()
    server_processor = AutoProcessor.from_pretrained(processor)
    engine = ServerEngine(
        ServerConfig(urls=tuple(server), backend=backend),
        server_processor.tokenizer,
        vocab_size=model_vocab_size(processor),
    )
    return engine, server_processor, None, str(Path(processor).resolve())
