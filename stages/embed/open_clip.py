"""open_clip embeddings: image tower (and text tower where samples have captions).

Images are decoded and preprocessed in DataLoader workers while the model runs;
bf16 autocast on CUDA, fp32 on CPU; output is L2-normalised float16 [N, D].
`pretrained` is an open_clip tag (needs the internet), a local checkpoint path, or
None for random weights (tests, offline smoke runs).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data import ManifestDataset
from pipeline.errors import CurateError


def load_clip(model_name: str, pretrained: str | None, device: torch.device):
    """(model in eval mode on device, image preprocess, tokenizer)."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except RuntimeError as exc:
        raise CurateError(f"embed open_clip: cannot load model '{model_name}' with pretrained={pretrained!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


class _Preprocessed:
    """uint8 CHW tensor -> CLIP input tensor (grey images repeated to RGB)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import to_pil_image

        return self.preprocess(to_pil_image(img.expand(3, -1, -1) if img.shape[0] == 1 else img))


def _collate(items):
    return torch.stack([it["image"] for it in items])


@torch.no_grad()
def encode_images(model, preprocess, manifest_path, *, device: torch.device, batch_size: int = 256,
                  num_workers: int = 2, progress=None) -> np.ndarray:
    """L2-normalised image embeddings, float16 [N, D], in manifest row order."""
    ds = ManifestDataset(manifest_path, transform=_Preprocessed(preprocess))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda",
                                         persistent_workers=False,
                                         # forkserver: a forked worker inherits this process's threads (Prefect's
                                         # event loops, Dask's) and died at exit with code 1 after a flow had run
                                         multiprocessing_context="forkserver" if num_workers else None)
    out = []
    for x in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = model.encode_image(x.to(device, non_blocking=True))
        out.append(torch.nn.functional.normalize(f.float(), dim=-1).half().cpu())
        if progress:
            progress(len(x))
    return torch.cat(out).numpy()


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], *, device: torch.device, batch_size: int = 256,
                 progress=None) -> np.ndarray:
    """L2-normalised text embeddings, float16 [N, D]. Without a `progress(n)` callback, the captions
    get their own bar (and progress lines where the output is not a terminal)."""
    if progress is None:
        from pipeline.progress import progress as bar

        with bar(len(texts), "embed: open_clip captions", unit=" txt") as step:
            return encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size, progress=step)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = model.encode_text(tokens)
        out.append(torch.nn.functional.normalize(f.float(), dim=-1).half().cpu())
        progress(len(tokens))
    return torch.cat(out).numpy()
