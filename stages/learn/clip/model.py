"""A small CLIP built from open_clip's own towers, so that we can train one on our data.

Images enter as uint8 [B, C, H, W] with C = 1 (grey) or 3 (RGB). `prepare_images` scales
them to [-1, 1] (x / 127.5 - 1: stages.learn.trainer's `normalise`, no dataset statistics,
so a checkpoint needs nothing but its weights) and repeats a grey channel to three,
because open_clip's ViT patch embedding takes RGB. Text is open_clip's BPE tokens, padded
or truncated to the arch's context. Checkpoints are safetensors weights plus a JSON of the
arch beside them (never pickle).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.errors import CurateError

from stages.learn.models import seeded_init
from stages.learn.trainer import normalise

VOCAB_SIZE = 49408  # open_clip SimpleTokenizer().vocab_size (BPE merges + 2 special tokens)
CHECKPOINT_FORMAT = "curate-clip/1"
# ln of the initial inverse temperature: 3, not open_clip's 1/0.07. With few distinct captions
# (class templates) and 14.3, the text tower collapsed to one embedding in the first few
# dozen steps for 2 of 6 seeds on digits (loss stuck at ln(batch)); at 3 none did.
INIT_LOGIT_SCALE = math.log(3.0)


@dataclass(frozen=True)
class ClipArch:
    """Tower sizes. The defaults are the recipe's tiny CLIP: ViT 4 layers, width 192, patch 4;
    text transformer 3 layers, width 128, context 16; joint embedding 128. Heads default to
    width // 64 (open_clip's head width). init_logit_scale only matters for a fresh model:
    the scale is a learned weight."""
    embed_dim: int = 128
    vision_layers: int = 4
    vision_width: int = 192
    vision_heads: int | None = None
    patch_size: int = 4
    text_layers: int = 3
    text_width: int = 128
    text_heads: int | None = None
    context: int = 16
    vocab_size: int = VOCAB_SIZE
    init_logit_scale: float = INIT_LOGIT_SCALE

    def heads(self) -> tuple[int, int]:
        """(vision heads, text heads), checked to divide their widths."""
        vh = self.vision_heads or max(1, self.vision_width // 64)
        th = self.text_heads or max(1, self.text_width // 64)
        if self.vision_width % vh or self.text_width % th:
            raise CurateError(f"clip arch: heads ({vh}, {th}) must divide widths ({self.vision_width}, {self.text_width})")
        return vh, th


def build_clip(arch: ClipArch, image_size: int | tuple[int, int], seed: int):
    """A freshly initialised open_clip.CLIP on the CPU, the same weights for the same seed.

    Init draws from torch's global generator (open_clip offers no other way); it is seeded
    inside `fork_rng`, so the caller's RNG state is left as it was.
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h % arch.patch_size or w % arch.patch_size:
        raise CurateError(f"clip: image size {h}x{w} is not a multiple of the patch size {arch.patch_size}")
    vh, th = arch.heads()
    vision = CLIPVisionCfg(layers=arch.vision_layers, width=arch.vision_width, head_width=arch.vision_width // vh,
                           patch_size=arch.patch_size, image_size=(h, w))
    text = CLIPTextCfg(context_length=arch.context, vocab_size=arch.vocab_size, width=arch.text_width,
                       heads=th, layers=arch.text_layers)
    model = seeded_init(seed, lambda: open_clip.CLIP(arch.embed_dim, vision_cfg=vision, text_cfg=text,
                                                     init_logit_scale=arch.init_logit_scale))
    return model


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(captions: list[str], context: int) -> tuple[torch.Tensor, int]:
    """(LongTensor [N, context], how many captions were truncated).

    Same ids as open_clip's tokenizer: <start> tokens <end>, zero-padded; a caption that
    does not fit keeps its first context - 1 tokens and ends with <end> (the text tower pools
    at the <end> token, so it must survive). Each distinct caption is encoded once.
    """
    tok = _tokenizer()
    sot, eot = tok.sot_token_id, tok.eot_token_id
    out = torch.zeros(len(captions), context, dtype=torch.long)
    cache: dict[str, list[int]] = {}
    truncated = 0
    for i, text in enumerate(captions):
        ids = cache.get(text)
        if ids is None:
            ids = cache[text] = [sot, *tok.encode(text), eot]
        if len(ids) > context:
            truncated += 1
            ids = ids[:context - 1] + [eot]
        out[i, :len(ids)] = torch.tensor(ids)
    return out, truncated


def prepare_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float [B, 3, H, W] in [-1, 1]; grey (C = 1) repeated to RGB."""
    return to_rgb(normalise(x))


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if x.shape[1] != 3:
        raise CurateError(f"clip: images must have 1 or 3 channels, got {x.shape[1]}")
    return x


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_clip(model, arch: ClipArch, path) -> None:
    """Weights to `path` (safetensors) and the arch to the same name with `.json`; each file
    is written beside itself and renamed into place, so a killed save leaves no half file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "arch": asdict(arch), "image_size": list(model.visual.image_size)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    side = _sidecar(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, side)


def load_clip_checkpoint(path):
    """(model on the CPU in eval mode, arch) from `save_clip`'s files; a CurateError when a file
    is missing, the JSON is not an arch, or the weights do not fit the arch."""
    from safetensors.torch import load_file

    path = Path(path)
    side = _sidecar(path)
    for p in (path, side):
        if not p.is_file():
            raise CurateError(f"clip checkpoint: {p} does not exist")
    try:
        meta = json.loads(side.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        known = {f.name for f in fields(ClipArch)}
        unknown = sorted(set(meta["arch"]) - known)
        if unknown:
            raise ValueError(f"unknown arch fields {unknown}")
        arch = ClipArch(**meta["arch"])
        model = build_clip(arch, tuple(meta["image_size"]), seed=0)
    except CurateError as exc:
        raise CurateError(f"clip checkpoint {side}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CurateError(f"clip checkpoint {side}: not a valid arch JSON ({exc})") from None
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CurateError(f"clip checkpoint {path}: cannot read weights ({str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CurateError(f"clip checkpoint {path}: weights do not match the arch in {side.name} ({detail})") from None
    return model.eval(), arch
