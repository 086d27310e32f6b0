"""Tree-shared training forward (issue 13): every node of a rollout tree computed once, images included.

The N leaves of a tree share the prompt (with the global image) and their early turns (text and crop
observations). :func:`pack_tree` lays each unique node's tokens out once, depth-first, keyed by the
sampler's node ids (never by token ids: two crops with the same grid give identical token runs), with
each token's position ids taken from the leaves themselves (Qwen2.5-VL's ``get_rope_index`` only looks
backwards, so a shared token has the same ids in every leaf) and only the unique images, in packed order.
:func:`tree_forward` runs the model once over the packed tree under an ancestor mask (token q sees token
k iff k's node is q's node or one of its ancestors and k <= q), gathers each leaf's response positions
before the LM head (the last token of a shared node predicts a different token in each child), and
returns per-leaf log-probs and entropies computed as verl's FSDP engine computes them. Autograd sums the
leaves' gradients on shared nodes, so any loss over the outputs has the per-leaf forward's gradient.

No verl import: the verl adapter passes verl's own log-prob/entropy functions when it needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

LogprobFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits [n, V], labels [n]) -> log-probabilities [n]."""
EntropyFn = Callable[[torch.Tensor], torch.Tensor]
"""logits [n, V] -> entropy [n]."""


@dataclass(frozen=True)
class LeafSequence:
    """One leaf as the trainer holds it (verl's per-sample tensors) plus its path in the tree."""

    input_ids: torch.Tensor
    """[L] prompt then response token ids."""
    position_ids: torch.Tensor
    """[4, L] verl's rows for Qwen2.5-VL: the text position, then mRoPE temporal / height / width."""
    prompt_len: int
    """P: tokens of the prompt (the tree's root node)."""
    node_path: Sequence[int]
    """Node ids from the root to the leaf (:attr:`visionleaf.rollout.tree.Leaf.node_path`)."""
    pixel_values: torch.Tensor | None = None
    """[patches, D] every image of the sequence in order (the processor's output); None without images."""
    image_grid_thw: torch.Tensor | None = None
    """[images, 3] grid of each image, in order."""


@dataclass(frozen=True)
class PackedTree:
    """The unique nodes of one tree as a single sequence, and how to read each leaf back from it."""

    input_ids: torch.Tensor
    """[T] each unique node's tokens once, depth-first (the root is the prompt)."""
    position_ids: torch.Tensor
    """[4, T] the leaves' own position ids at the unique slots."""
    node_index: torch.Tensor
    """[T] depth-first index of the node each packed token belongs to."""
    ancestors: torch.Tensor
    """[nodes, nodes] bool: ``ancestors[a, b]`` iff node b is node a or an ancestor of it."""
    pixel_values: torch.Tensor | None
    """[patches, D] the unique images, in packed order."""
    image_grid_thw: torch.Tensor | None
    """[unique images, 3]."""
    leaf_index: tuple[torch.Tensor, ...]
    """Per leaf, [L_i] the packed slot of each of its tokens."""
    predict_index: torch.Tensor
    """[sum R_i] packed slot of the token that predicts each response token, leaf after leaf."""
    labels: torch.Tensor
    """[sum R_i] the response tokens, leaf after leaf."""
    response_lens: tuple[int, ...]
    """R_i per leaf."""

    @property
    def tokens_packed(self) -> int:
        """T: tokens one tree-shared forward runs through the model."""
        return int(self.input_ids.numel())

    @property
    def tokens_per_leaf(self) -> int:
        """sum L_i: tokens the per-leaf forwards run through the model."""
        return sum(int(index.numel()) for index in self.leaf_index)

    def attention_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[T, T] bool, built on ``device``: q (row) sees k (column) iff k's node is q's node or an ancestor,
        and k <= q."""
        nodes, ancestors = self.node_index.to(device), self.ancestors.to(device)
        return torch.tril(ancestors[nodes[:, None], nodes[None, :]])  # [T, T]


@dataclass(frozen=True)
class TreeOutput:
    """Per-leaf outputs of :func:`tree_forward`, each aligned with the leaf's response tokens."""

    log_probs: tuple[torch.Tensor, ...]
    """[R_i] log-probability of each response token."""
    entropy: tuple[torch.Tensor, ...] | None
    """[R_i] entropy of the next-token distribution at each response token; None when not asked for."""


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label], as verl's ``logprobs_from_logits`` without flash-attn. [n, V], [n] -> [n]."""
    picked = logits.gather(-1, labels[:, None]).squeeze(-1)  # [n]
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits), the formula of verl's ``entropy_from_logits``. [n, V] -> [n]."""
    probs = torch.softmax(logits, dim=-1)  # [n, V]
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def node_spans(nodes: Sequence[Any]) -> dict[int, tuple[int, int]]:
    """Node id -> response span [start, end) from a :class:`~visionleaf.rollout.tree.TreeRecord`'s nodes."""
    return {int(node.id): (int(node.span[0]), int(node.span[1])) for node in nodes}


def _image_starts(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Offsets where each run of image tokens begins (one run per image)."""
    is_image = input_ids == image_token_id  # [L]
    previous = torch.cat([is_image.new_zeros(1), is_image[:-1]])  # [L]
    return torch.nonzero(is_image & ~previous).flatten().tolist()


def _segments(leaf: LeafSequence, spans: Mapping[int, tuple[int, int]], i: int) -> list[tuple[int, int, int]]:
    """(node id, start, end) of each node on the leaf's path, in the leaf's own token offsets."""
    path = list(leaf.node_path)
    length = int(leaf.input_ids.numel())
    if not path:
        raise ValueError(f"leaf {i} has an empty node_path; it needs the node ids from the root to the leaf")
    segments = [(path[0], 0, leaf.prompt_len)]
    for node in path[1:]:
        if node not in spans:
            raise ValueError(f"leaf {i}: node {node} of its path has no span; pass every node of the tree's record")
        start, end = spans[node]
        if leaf.prompt_len + start != segments[-1][2] or end < start:
            raise ValueError(f"leaf {i}: span {start, end} of node {node} does not follow its parent's tokens")
        segments.append((node, leaf.prompt_len + start, leaf.prompt_len + end))
    if segments[-1][2] != length:
        raise ValueError(
            f"leaf {i} has {length} tokens but its path's spans end at {segments[-1][2]}: a response cut or "
            "padded after the rollout cannot be packed (keep whole responses, or run it per leaf)"
        )
    return segments


def pack_tree(leaves: Sequence[LeafSequence], spans: Mapping[int, tuple[int, int]], image_token_id: int) -> PackedTree:
    """Pack the leaves of one tree: unique nodes once, depth-first, children in order of first appearance.

    ``spans``: node id -> response offsets [start, end) (:func:`node_spans` of the tree's record).
    ``image_token_id``: the ``<|image_pad|>`` id, to tell which images each node holds.
    Raises ValueError when the leaves do not form one tree or disagree on a shared token or position.
    """
    if not leaves:
        raise ValueError("pack_tree needs at least one leaf")
    segments = [_segments(leaf, spans, i) for i, leaf in enumerate(leaves)]
    root = segments[0][0][0]
    children: dict[int, list[int]] = {}
    first: dict[int, tuple[int, int, int]] = {}  # node -> (leaf, start, end) of its first occurrence
    parent: dict[int, int | None] = {}
    for i, path in enumerate(segments):
        if path[0][0] != root:
            raise ValueError(f"leaf {i} starts at node {path[0][0]}, leaf 0 at node {root}: pack one tree at a time")
        for depth, (node, start, end) in enumerate(path):
            up = path[depth - 1][0] if depth else None
            if node in first:
                if parent[node] != up:
                    raise ValueError(f"node {node} has parent {parent[node]} in one leaf and {up} in leaf {i}")
                continue
            first[node], parent[node] = (i, start, end), up
            children.setdefault(node, [])
            if up is not None:
                children[up].append(node)

    order: list[int] = []
    stack = [root]
    while stack:  # depth-first: a node's subtree is contiguous and follows it
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))
    rank = {node: k for k, node in enumerate(order)}

    ids, positions, node_index, offset = [], [], [], {}
    pixels: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    total = 0
    image_info = [_leaf_images(leaf, image_token_id, i) for i, leaf in enumerate(leaves)]
    for node in order:
        i, start, end = first[node]
        leaf = leaves[i]
        offset[node] = total
        ids.append(leaf.input_ids[start:end])
        positions.append(leaf.position_ids[:, start:end])
        node_index.append(torch.full((end - start,), rank[node], dtype=torch.long))
        total += end - start
        starts, patch_offsets = image_info[i]
        for k, image_start in enumerate(starts):
            if start <= image_start < end:
                assert leaf.pixel_values is not None and leaf.image_grid_thw is not None
                pixels.append(leaf.pixel_values[patch_offsets[k] : patch_offsets[k + 1]])
                grids.append(leaf.image_grid_thw[k])
    packed_ids = torch.cat(ids)  # [T]
    packed_positions = torch.cat(positions, dim=1)  # [4, T]

    leaf_index = []
    for i, (leaf, path) in enumerate(zip(leaves, segments, strict=True)):
        for n, start, end in path:
            if end - start != first[n][2] - first[n][1]:
                raise ValueError(
                    f"node {n} has {end - start} tokens in leaf {i} "
                    f"but {first[n][2] - first[n][1]} in leaf {first[n][0]}"
                )
        index = torch.cat([torch.arange(offset[n], offset[n] + end - start) for n, start, end in path])  # [L_i]
        if not torch.equal(packed_ids[index], leaf.input_ids):
            raise ValueError(f"leaf {i} disagrees with an earlier leaf on the tokens of a shared node")
        if not torch.equal(packed_positions[:, index], leaf.position_ids):
            raise ValueError(f"leaf {i} disagrees with an earlier leaf on the position ids of a shared node")
        leaf_index.append(index)

    ancestors = torch.zeros(len(order), len(order), dtype=torch.bool)  # [nodes, nodes]
    for node in order:
        up = parent[node]
        if up is not None:
            ancestors[rank[node]] = ancestors[rank[up]]
        ancestors[rank[node], rank[node]] = True

    response_lens = tuple(int(leaf.input_ids.numel()) - leaf.prompt_len for leaf in leaves)
    if min(leaf.prompt_len for leaf in leaves) < 1:
        raise ValueError("every leaf needs a prompt of at least one token (the token that predicts the response)")
    predict_index = torch.cat(
        [index[leaf.prompt_len - 1 : -1] for leaf, index in zip(leaves, leaf_index, strict=True)]
    )  # [sum R]
    labels = torch.cat([leaf.input_ids[leaf.prompt_len :] for leaf in leaves])  # [sum R]
    return PackedTree(
        input_ids=packed_ids,
        position_ids=packed_positions,
        node_index=torch.cat(node_index),
        ancestors=ancestors,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.stack(grids) if grids else None,
        leaf_index=tuple(leaf_index),
        predict_index=predict_index,
        labels=labels,
        response_lens=response_lens,
    )


def _leaf_images(leaf: LeafSequence, image_token_id: int, i: int) -> tuple[list[int], list[int]]:
    """(token offset where each image starts, patch offsets [images + 1] into ``pixel_values``)."""
    starts = _image_starts(leaf.input_ids, image_token_id)
    grid = leaf.image_grid_thw
    count = 0 if grid is None else int(grid.shape[0])
    if len(starts) != count or (count and leaf.pixel_values is None):
        raise ValueError(f"leaf {i} has {len(starts)} images in its tokens but {count} in image_grid_thw")
    patches = [0] + (grid.prod(-1).cumsum(0).tolist() if grid is not None else [])
    return starts, patches


def attention_mask_for(model: Any, mask: torch.Tensor) -> torch.Tensor:
    """The [T, T] bool tree mask in the form the model's attention takes: [1, 1, T, T] bool for ``sdpa``,
    additive for ``eager``."""
    impl = model.config._attn_implementation
    mask = mask[None, None]  # [1, 1, T, T]
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = model.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"tree_forward takes a dense mask, so attn_implementation must be 'sdpa' or 'eager', got {impl!r}; "
        "load the model with attn_implementation='sdpa'"
    )


def tree_forward(
    model: Any,
    packed: PackedTree,
    temperature: float = 1.0,
    calculate_entropy: bool = True,
    logprob_fn: LogprobFn = token_logprobs,
    entropy_fn: EntropyFn = token_entropy,
    logits_to_keep: bool = True,
) -> TreeOutput:
    """One forward of a Qwen2.5-VL model over a packed tree; per-leaf log-probs (and entropies) of the
    response tokens, as a per-leaf forward gives them. Logits are divided by ``temperature`` first (verl).

    ``logits_to_keep=False`` is for forwards that ignore HF's ``logits_to_keep`` (verl's patched Qwen2.5-VL
    forward): the model returns logits at every packed slot and the predicting slots are picked from them
    (the same values: a slot's logits depend only on its hidden state)."""
    device = model.device
    vision: dict[str, torch.Tensor] = {}
    if packed.pixel_values is not None and packed.image_grid_thw is not None:
        vision = {
            "pixel_values": packed.pixel_values.to(device, model.dtype),
            "image_grid_thw": packed.image_grid_thw.to(device),
        }
    output = model(
        input_ids=packed.input_ids[None].to(device),  # [1, T]
        position_ids=packed.position_ids[:, None].to(device),  # [4, 1, T]
        attention_mask=attention_mask_for(model, packed.attention_mask(device)),
        use_cache=False,
        **vision,
        # hidden states gathered per leaf before the LM head
        **({"logits_to_keep": packed.predict_index.to(device)} if logits_to_keep else {}),
    )
    logits = output.logits[0]  # [sum R, V], or [T, V] without logits_to_keep
    if not logits_to_keep:
        logits = logits[packed.predict_index.to(device)]  # [sum R, V]
    logits = logits / temperature
    labels = packed.labels.to(device)  # [sum R]
    log_probs = logprob_fn(logits, labels)  # [sum R]
    sizes = list(packed.response_lens)
    entropy = tuple(entropy_fn(logits).split(sizes)) if calculate_entropy else None
    return TreeOutput(tuple(log_probs.split(sizes)), entropy)


def leaf_sequence(model: Any, processor: Any, leaf: Any) -> LeafSequence:
    """A rollout :class:`~visionleaf.rollout.tree.Leaf` as the trainer holds it: its images through the
    processor and position ids built as verl's agent loop builds them (the model's ``get_rope_index`` for
    the mRoPE rows, the token index for the text row)."""
    input_ids = torch.tensor(list(leaf.prompt_ids) + list(leaf.response_ids), dtype=torch.long)  # [L]
    length = int(input_ids.numel())
    text = torch.arange(length)[None]  # [1, L]
    pixel_values = grid = None
    if leaf.images:
        processed = processor.image_processor(images=list(leaf.images), return_tensors="pt")
        pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]  # [patches, D], [n, 3]
        token_types = (input_ids == model.config.image_token_id).int()[None]  # [1, L]
        mrope, _ = model.model.get_rope_index(input_ids[None], token_types, image_grid_thw=grid)  # [3, 1, L]
        position_ids = torch.cat([text, mrope[:, 0].cpu()])  # [4, L]
    else:
        position_ids = text.expand(4, -1)  # [4, L]
    return LeafSequence(
        input_ids=input_ids,
        position_ids=position_ids,
        prompt_len=len(leaf.prompt_ids),
        node_path=tuple(leaf.node_path),
        pixel_values=pixel_values,
        image_grid_thw=grid,
    )
