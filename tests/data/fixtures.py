"""DeepEyes-Datasets-47k parquet files written in the release's layout (verl RLHF rows with image bytes)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DEEPEYES_INSTRUCTION = (
    "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>  "
    "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
)
"""The tool instruction DeepEyes' rows append to the question."""

DEEPEYES_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("env_name", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [("answer", pa.string()), ("index", pa.int64()), ("question", pa.string()), ("split", pa.string())]
            ),
        ),
    ]
)
"""Columns of the release's parquet files (images as HF datasets' Image feature: bytes + path)."""


def deepeyes_row(
    data_source: str, question: str, answer: str, images: list[bytes], index: int = 0, instruction: bool = True
) -> dict:
    """One row as the release holds it: system + user turn (``<image>``, question, tool instruction)."""
    return {
        "data_source": data_source,
        "prompt": [
            {"content": "You are a helpful assistant.", "role": "system"},
            {"content": f"<image>\n{question}{DEEPEYES_INSTRUCTION if instruction else ''}", "role": "user"},
        ],
        "images": [{"bytes": image, "path": None} for image in images],
        "ability": "visual_toolbox_v2" if data_source != "thinklite_eureka" else "math",
        "env_name": "visual_toolbox_v2",
        "reward_model": {"ground_truth": answer, "style": "model"},
        "extra_info": {"answer": answer, "index": index, "question": question, "split": "train"},
    }


def write_deepeyes_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=DEEPEYES_SCHEMA), path, row_group_size=2)
    return path
