"""Starting weights: reading checkpoints, adapting them, loading them into a zoo model.

Starting points (``model.weights``): ``none``, ``imagenet`` (torchvision's or timm's weights,
downloaded to the torch hub / Hugging Face cache), a local checkpoint path, or ``pretrain`` (the
suite's own supervised pre-training stage, see :mod:`metalr_bench.benchmark.training.pretrain`),
so the transfer setting works offline. Loading re-uses RGB stem filters for grey-scale inputs,
pairs a foreign checkpoint's keys by position on request, applies the card's own fix-ups and
always starts a new head. Imports :mod:`.builders` (the cards) and :mod:`.plans`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from metalr_bench.benchmark.models.builders import MODELS, TIMM_PREFIX, get_card
from metalr_bench.benchmark.models.plans import _plan
from torch import nn


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Re-use RGB stem filters for ``in_channels`` inputs (timm's rule).

    Grey-scale sums the RGB filters (a grey image is R=G=B); more channels tile and rescale so
    the activation scale stays the same.
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (c / in_channels)


class WeightsMismatch(ValueError):
    """A checkpoint that does not belong to the model's architecture."""


#: what ``model.weights_mapping`` accepts: keys matched by name, or paired in order
WEIGHTS_MAPPINGS = ("names", "positional")

#: keys a USCL checkpoint holds besides its backbone (``features.*``): the SimCLR projection MLP
#: (``l1``, ``l2``; ``linear`` in the released ResNetUSCL) and classifiers (``fc``, ``fc1``,
#: ``fc2``); the public MetaLR code drops every key starting with ``l``, ``fc`` or ``classifier``
#: before pairing the rest by position (``l`` alone would drop torchvision's ``layer1...`` too)
USCL_HEAD_PREFIXES = ("l1.", "l2.", "linear.", "fc", "classifier")


def map_by_position(model: nn.Module, arch: str, state: Mapping[str, torch.Tensor], source: str,
                    *, drop_prefixes: tuple[str, ...] | list[str] = USCL_HEAD_PREFIXES,
                    ) -> dict[str, torch.Tensor]:
    """Rename a foreign checkpoint's tensors to ``model``'s backbone keys, pairing them in order.

    Why: a checkpoint saved from another wrapper of the same network (USCL's ``features.0``,
    ``features.4.0.conv1`` for torchvision's ``conv1``, ``layer1.0.conv1``) has other names but
    the same tensors in the same order, which is how the public MetaLR code loads its USCL start.
    Keys starting with one of ``drop_prefixes`` (the projection head, a classifier) are dropped;
    the rest pair with the model's state dict entries outside its head, in order. Every pair's
    shape must match (the stem's input channels excepted: :func:`load_state` adapts them), and
    the counts too; otherwise a :class:`WeightsMismatch` names the first mismatch. A checkpoint
    without BatchNorm's ``num_batches_tracked`` counters (older PyTorch) pairs without them
    (the model keeps its own).
    """
    plan = _plan(model, arch)
    head = plan.head + "."
    stem_key = f"{plan.stem_conv}.weight"
    prefixes = tuple(drop_prefixes)
    theirs = [(k, v) for k, v in state.items() if not (prefixes and k.startswith(prefixes))]
    ours = [(k, v) for k, v in model.state_dict().items() if not k.startswith(head)]
    counters: dict[str, torch.Tensor] = {}
    if not any(k.endswith("num_batches_tracked") for k, _ in theirs):
        counters = {k: v for k, v in ours if k.endswith("num_batches_tracked")}
        ours = [(k, v) for k, v in ours if k not in counters]
    dropped = f"after dropping keys starting with {', '.join(prefixes) or '(nothing)'}"
    for i, ((tk, tv), (ok, ov)) in enumerate(zip(theirs, ours, strict=False)):
        same = tuple(tv.shape) == tuple(ov.shape) or (
            ok == stem_key and tv.ndim == ov.ndim == 4
            and tv.shape[:1] + tv.shape[2:] == ov.shape[:1] + ov.shape[2:]
        )
        if not same:
            raise WeightsMismatch(
                f"checkpoint {source} does not pair with model {arch!r} by position ({dropped}): "
                f"position {i}: checkpoint {tk!r} {tuple(tv.shape)} vs model {ok!r} "
                f"{tuple(ov.shape)}. Check `model.arch`, and `model.drop_prefixes` for head keys "
                "left in the checkpoint."
            )
    if len(theirs) != len(ours):
        extra = (f"first unpaired checkpoint key: {theirs[len(ours)][0]!r}"
                 if len(theirs) > len(ours) else
                 f"first unpaired model key: {ours[len(theirs)][0]!r}")
        raise WeightsMismatch(
            f"checkpoint {source} does not pair with model {arch!r} by position: it holds "
            f"{len(theirs)} tensors {dropped}, the model's backbone {len(ours)} ({extra}). Check "
            "`model.arch`, and `model.drop_prefixes` for head keys left in the checkpoint."
        )
    return {ok: tv for (_, tv), (ok, _) in zip(theirs, ours, strict=True)} | counters


def load_state(model: nn.Module, arch: str, state: Mapping[str, torch.Tensor], source: str,
               *, keep_head: bool = False, mapping: str = "names",
               drop_prefixes: tuple[str, ...] | list[str] | None = None) -> None:
    """Load a backbone ``state`` into ``model``; the head stays freshly initialised.

    ``mapping="positional"`` first renames a foreign checkpoint's keys by position
    (:func:`map_by_position`, dropping ``drop_prefixes``, default :data:`USCL_HEAD_PREFIXES`);
    its head is never loaded.

    Why always new: a source head whose shape happens to match the target's (a 2-class source
    and a 2-class target, a 4-class source and OctMNIST) was trained for *other* classes; reusing
    it would make "linear probe" and L2-SP's head term start from a head for the wrong task, and
    only for some datasets. The public MetaLR code and Transfer-Learning-Library re-initialise
    the head too. ``keep_head=True`` (``model.keep_head`` in the config) keeps a matching head,
    for a checkpoint trained on the same classes.

    Raises a ValueError naming the checkpoint, the mismatching keys and the fix when the
    checkpoint does not belong to ``arch``.
    """
    if mapping not in WEIGHTS_MAPPINGS:
        raise ValueError(f"mapping={mapping!r}: expected one of {', '.join(WEIGHTS_MAPPINGS)}")
    if mapping == "positional":
        state = map_by_position(
            model, arch, state, source,
            drop_prefixes=USCL_HEAD_PREFIXES if drop_prefixes is None else drop_prefixes,
        )
    plan = _plan(model, arch)
    own = model.state_dict()
    state = dict(state)
    adapt = get_card(arch).adapt_state
    if adapt is not None:
        state = adapt(state, model)
    stem_key = f"{plan.stem_conv}.weight"
    if plan.stem_conv and stem_key in state and state[stem_key].shape[1] != own[stem_key].shape[1]:
        state[stem_key] = adapt_input_conv(state[stem_key], own[stem_key].shape[1])
    head = plan.head + "."
    state = {
        k: v for k, v in state.items()
        if not (k.startswith(head) and k in own and (not keep_head or own[k].shape != v.shape))
    }
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        problems = []
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        if bad_shape:
            problems.append(f"shape mismatch: {show(bad_shape)}")
        raise WeightsMismatch(
            f"checkpoint {source} does not match model {arch!r} ({'; '.join(problems)}). "
            f"Use a checkpoint saved from {arch!r}, or change `model.arch` to the checkpoint's "
            "architecture."
        )
    model.load_state_dict(state, strict=False)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (a bare state dict or ``{"model": state_dict}``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint {p} does not exist: pass an existing .pt file to `model.weights`, "
            "or use `weights: pretrain` to pre-train on a source dataset first"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        # PyTorch's weights_only error runs to six lines of advice ("Please file an issue",
        # "weights_only=False ... arbitrary code execution") that fit a pickle of classes, not a
        # text file: keep its last specific line (e.g. "Unsupported operand 103") only
        reason = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()
                       and "weights_only" not in ln and "Please file" not in ln
                       and not ln.strip().endswith("error:")), type(exc).__name__)
        raise ValueError(f"checkpoint {p} could not be read as a PyTorch file ({reason}); pass "
                         "a state dict saved with torch.save(model.state_dict(), path)") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {p} holds {type(obj).__name__}, expected a state dict")
    return obj


def imagenet_state(arch: str, in_channels: int = 3,
                   image_size: int | None = None) -> dict[str, torch.Tensor]:
    """``arch``'s ImageNet weights (torchvision's or timm's; needs the internet or a warm cache).

    ``in_channels``/``image_size``: timm adapts its stem and position embeddings to them;
    torchvision's state stays RGB (:func:`load_state` adapts the stem).
    """
    card = get_card(arch)
    if card.imagenet is None:
        have = [n for n, c in MODELS.items() if c.imagenet is not None]
        raise ValueError(f"no ImageNet weights for {arch!r}; available for {', '.join(have)} "
                         f"and {TIMM_PREFIX}<name>")
    return card.imagenet(in_channels, image_size)
