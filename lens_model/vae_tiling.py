"""Running a FLUX.2 VAE pass over a batch: tiling, overlap blending, progress and the CUDA
out-of-memory retry.

The model (:class:`lens_model.vae.Flux2VAE`) supplies one untiled pass over a crop of one sample;
this module decides, per sample, whether to run it whole or in tiles, plans the tiles, blends their
outputs, counts progress for the caller's ``callback(done, total)`` and, under ``tile="auto"`` on
CUDA, retries in tiles after an out-of-memory error. It knows nothing about the network.

Geometry is in latent cells (1 cell = 16 px for the FLUX.2 VAE): tiles of ``size`` x ``size``
cells start every ``size - overlap`` cells, the last one aligned to the far edge, and their outputs
are blended with weights that ramp linearly across the overlap on every side that touches another
tile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .constants import LATENT_CELL_PIXELS

logger = logging.getLogger(__name__)

__all__ = [
    "OnBlock",
    "PROGRESS_UNITS",
    "Progress",
    "ProgressCallback",
    "TILE_MODES",
    "TILE_PX_RANGE",
    "TileArg",
    "Tiling",
    "blend_weights",
    "passes_per_unit",
    "tile_starts",
    "tiling_from_pixels",
]

#: ``tile`` argument of encode / decode: False (never), True (when larger than a tile) or "auto".
TileArg = bool | str
#: ``callback(done, total)``: units finished so far, of ``total``. Units are tiles (samples when
#: untiled) with ``progress_unit="tile"``, or encoder / decoder blocks of every tile and sample with
#: ``progress_unit="block"``.
ProgressCallback = Callable[[int, int], None]
PROGRESS_UNITS = ("tile", "block")
#: ``on_block()``: called by the network after each of its blocks (it may raise to abort).
OnBlock = Callable[[], None]
#: ``run_tile(i, rows, cols, on_block)`` -> ``[1, C, rows * scale, cols * scale]`` float32 on the
#: CPU: one untiled pass over sample ``i`` cropped to the latent cells ``rows`` x ``cols``.
RunTile = Callable[[int, slice, slice, "OnBlock | None"], torch.Tensor]

#: Tile modes offered to users: "auto", "on" (tile when larger than a tile), "off" (never), with
#: the ``tile`` argument of encode / decode each stands for.
TILE_MODES: dict[str, TileArg] = {"auto": "auto", "on": True, "off": False}
#: Tile sides a user may ask for, in pixels.
TILE_PX_RANGE = (128, 4096)


def tiling_from_pixels(mode: str, tile_px: int, device: torch.device | str) -> tuple[TileArg, int, int]:
    """Encode / decode tiling for a tile side given in pixels, for callers that must be able to stop
    a pass quickly (ComfyUI's Cancel): ``-> (tile, tile_size, overlap)`` with the sizes in latent
    cells and a quarter of the tile (at least one cell) as overlap.

    ``mode`` is a key of :data:`TILE_MODES`; "auto" tiles on the CPU, where a whole 1024² image is
    one pass of minutes, and keeps the library's "auto" elsewhere (untiled unless memory is short).
    ``tile_px`` must be a multiple of 16 in :data:`TILE_PX_RANGE`; ValueError otherwise.
    """
    if mode not in TILE_MODES:
        raise ValueError(f"tile must be one of {', '.join(map(repr, TILE_MODES))}, got {mode!r}")
    lo, hi = TILE_PX_RANGE
    if (isinstance(tile_px, bool) or not isinstance(tile_px, int) or tile_px % LATENT_CELL_PIXELS
            or not lo <= tile_px <= hi):
        raise ValueError(f"tile_size must be a multiple of {LATENT_CELL_PIXELS} pixels from {lo} to {hi}, "
                         f"got {tile_px!r}")
    tile = TILE_MODES[mode]
    if tile == "auto" and torch.device(device).type == "cpu":
        tile = True
    cells = tile_px // LATENT_CELL_PIXELS
    return tile, cells, max(1, cells // 4)


def passes_per_unit(progress_unit: str, blocks_per_pass: int) -> int:
    """Progress units in one pass: 1 for ``"tile"``, ``blocks_per_pass`` for ``"block"``."""
    if progress_unit not in PROGRESS_UNITS:
        raise ValueError(f"progress_unit must be one of {PROGRESS_UNITS}, got {progress_unit!r}.")
    return blocks_per_pass if progress_unit == "block" else 1


class Progress:
    """Counts finished units and reports them to an optional callback.

    ``total`` counts passes (tiles / samples). With ``blocks_per_pass`` 1 a unit is a pass
    (:meth:`step`); with more, a unit is one encoder / decoder block (:attr:`on_block`, handed to the
    network) and :meth:`step` reports nothing.
    """

    def __init__(self, callback: ProgressCallback | None, total: int, blocks_per_pass: int = 1) -> None:
        self.callback = callback
        self.per_pass = max(1, blocks_per_pass)
        self.total = total * self.per_pass
        self.done = 0

    @property
    def on_block(self) -> OnBlock | None:
        """The network's ``on_block`` hook: :meth:`block` when units are blocks, else None."""
        return self.block if self.per_pass > 1 else None

    def grow(self, extra: int) -> None:
        self.total += max(0, extra) * self.per_pass

    def block(self) -> None:
        if self.per_pass > 1:
            self._tick()

    def step(self) -> None:
        if self.per_pass == 1:
            self._tick()

    def _tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


def tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """First cells of the tiles along a side of ``n`` cells: every ``size - overlap`` cells, the
    last tile ending at ``n``; ``[0]`` when one tile covers the side."""
    if n <= size:
        return [0]
    stride = size - overlap
    starts = list(range(0, n - size, stride))
    starts.append(n - size)
    return starts


def blend_weights(length: int, ramp: int, start: bool, end: bool) -> torch.Tensor:
    """1-D blend weights ``[length]``: rise over ``ramp`` samples at the start / fall at the end
    (never 0), 1 elsewhere."""
    wgt = torch.ones(length, dtype=torch.float32)
    r = min(ramp, length // 2)
    if r > 0:
        up = torch.arange(1, r + 1, dtype=torch.float32) / (r + 1)
        if start:
            wgt[:r] *= up
        if end:
            wgt[length - r:] *= up.flip(0)
    return wgt


def exceeds_free_memory(device: torch.device, need: int) -> bool:
    """True when ``device`` is CUDA and has less than ``need`` bytes free (never on other devices)."""
    if device.type != "cuda":
        return False
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:  # pragma: no cover - exotic backends
        return False
    return need > free


def try_untiled(run: Callable[[], torch.Tensor], device: torch.device, retry_on_oom: bool) -> torch.Tensor | None:
    """``run()``, or None when ``retry_on_oom`` and CUDA ran out of memory (the caller then tiles).

    The retry happens after this returns: inside the ``except`` block the exception's traceback
    would keep the failed attempt's activations alive (and unfreeable by ``empty_cache``).
    """
    if not (retry_on_oom and device.type == "cuda"):
        return run()
    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()
    return None


@dataclass(frozen=True)
class Tiling:
    """How one encode / decode call tiles (``tile``, ``size`` and ``overlap`` in latent cells).

    ``tile``: False = never tile; True = tile when the sample exceeds ``size`` cells; "auto" =
    untiled, but tiled when on CUDA the estimated peak exceeds free memory or the untiled pass runs
    out of memory (other devices never tile under "auto").
    """

    tile: TileArg = False
    size: int = 64
    overlap: int = 16

    def __post_init__(self) -> None:
        if self.tile not in (True, False, "auto"):
            raise ValueError(f"tile must be True, False or 'auto', got {self.tile!r}.")
        if self.size < 1 or self.overlap < 0 or self.overlap >= self.size:
            raise ValueError(f"need tile_size >= 1 and 0 <= overlap < tile_size, got tile_size={self.size}, "
                             f"overlap={self.overlap}.")

    def count(self, h: int, w: int) -> int:
        """Tiles covering an ``h x w`` cell grid."""
        return len(tile_starts(h, self.size, self.overlap)) * len(tile_starts(w, self.size, self.overlap))

    def blend(self, run_tile: Callable[[slice, slice], torch.Tensor], h: int, w: int, channels: int,
              scale: int, progress: Progress) -> torch.Tensor:
        """``run_tile(rows, cols)`` over the tiles of an ``h x w`` cell grid, blended into
        ``[1, channels, h * scale, w * scale]`` float32 on the CPU (``scale``: output samples per
        cell). One :meth:`Progress.step` per tile; a grid that fits one tile is run whole."""
        ys = tile_starts(h, self.size, self.overlap)
        xs = tile_starts(w, self.size, self.overlap)
        if len(ys) == 1 and len(xs) == 1:
            out = run_tile(slice(0, h), slice(0, w))
            progress.step()
            return out
        out = torch.zeros(1, channels, h * scale, w * scale, dtype=torch.float32)
        wsum = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float32)
        ramp = self.overlap * scale
        for y0 in ys:
            th = min(self.size, h - y0)
            wy = blend_weights(th * scale, ramp, y0 > 0, y0 + th < h)
            rows = slice(y0 * scale, (y0 + th) * scale)
            for x0 in xs:
                tw = min(self.size, w - x0)
                wx = blend_weights(tw * scale, ramp, x0 > 0, x0 + tw < w)
                cols = slice(x0 * scale, (x0 + tw) * scale)
                part = run_tile(slice(y0, y0 + th), slice(x0, x0 + tw))
                mask = wy[:, None] * wx[None, :]
                out[:, :, rows, cols].addcmul_(part, mask)
                wsum[:, :, rows, cols].add_(mask)
                progress.step()
        return out.div_(wsum)

    def run(self, run_tile: RunTile, batch: int, grid: tuple[int, int], *, channels: int, scale: int,
            callback: ProgressCallback | None, blocks_per_pass: int, device: torch.device,
            need_bytes: int, what: str) -> Iterator[torch.Tensor]:
        """Yields, for each of ``batch`` samples, its ``[1, channels, h * scale, w * scale]`` output
        (float32, CPU), untiled or blended from tiles as :attr:`tile` decides.

        ``grid``: the sample's ``(h, w)`` in latent cells. ``callback`` gets one unit per pass, or
        ``blocks_per_pass`` per pass (see :func:`passes_per_unit`); its total grows when "auto"
        switches a sample to tiles. ``need_bytes``: estimated peak of one untiled pass on
        ``device``. ``what``: "encode" / "decode", for the log.
        """
        h, w = grid
        n_tiles = self.count(h, w)
        progress = Progress(callback, batch * (n_tiles if self.tile is True else 1), blocks_per_pass)
        for i in range(batch):
            def tile_of(rows: slice, cols: slice, i: int = i) -> torch.Tensor:
                return run_tile(i, rows, cols, progress.on_block)

            use_tiles = self.tile is True
            if self.tile == "auto" and exceeds_free_memory(device, need_bytes):
                logger.info("VAE %s: estimated memory exceeds free memory; running in tiles.", what)
                use_tiles = True
                progress.grow(n_tiles - 1)
            if use_tiles:
                yield self.blend(tile_of, h, w, channels, scale, progress)
                continue
            out = try_untiled(lambda: tile_of(slice(0, h), slice(0, w)), device, self.tile == "auto")
            if out is None:
                logger.warning("VAE %s ran out of GPU memory; retrying in %d-cell tiles.", what, self.size)
                progress.grow(n_tiles - 1)
                out = self.blend(tile_of, h, w, channels, scale, progress)
            else:
                progress.step()
            yield out
