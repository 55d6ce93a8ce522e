"""Where the images and videos sit in a prompt, and how a shortened batch is laid out again.

A segment is the run of visual placeholders of one image or one video in one row. The model fills
placeholders with features in row-major order (`masked_scatter`), so the k-th image segment of the batch
holds the k-th image's features; that is how per-image scores are matched to segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PruneError


@dataclass
class Segment:
    row: int
    start: int
    length: int
    video: bool
    frame_len: int | None = None  # videos: placeholders per frame (temporal unit)

    @property
    def positions(self) -> slice:
        return slice(self.start, self.start + self.length)


def find_segments(
    adapter, input_ids: torch.Tensor, positions: torch.Tensor, images: bool = True, videos: bool = True
) -> list[Segment]:
    """Segments of a batch, in row-major order (the order the model consumes images and videos).
    `positions`: the language model's position ids `[..., B, S]` (frame lengths of videos come from them).
    `images` / `videos`: whether the call carries that modality; placeholder ids of the other are text."""
    image_id = adapter.image_token_id() if images else None
    video_id = adapter.video_token_id() if videos else None
    per_image = adapter.image_segment_length()
    segments: list[Segment] = []
    ids = input_ids.tolist()
    for row, tokens in enumerate(ids):
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token not in (image_id, video_id):
                pos += 1
                continue
            end = pos
            while end < len(tokens) and tokens[end] == token:
                end += 1
            if token == image_id:
                step = per_image or end - pos
                if (end - pos) % step:
                    raise PruneError(
                        f"row {row}: a run of {end - pos} image placeholders is not a whole number of "
                        f"{step}-token images; the prompt does not match the model's image size"
                    )
                segments += [Segment(row, s, step, False) for s in range(pos, end, step)]
            else:
                frame_len = adapter.video_frame_length(positions[..., row, pos:end])
                segments.append(Segment(row, pos, end - pos, True, frame_len))
            pos = end
    return segments


def left_pad(rows: list[torch.Tensor], length: int, fill: float | int = 0) -> torch.Tensor:
    """Stack 1-D or [..., n] rows into [..., B, length], padding on the left (as generation pads)."""
    first = rows[0]
    out = torch.full((*first.shape[:-1], len(rows), length), fill, dtype=first.dtype, device=first.device)
    for b, row in enumerate(rows):
        out[..., b, length - row.shape[-1] :] = row
    return out
