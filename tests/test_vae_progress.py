"""VAE decode / encode progress per block (progress_unit="block"): finer progress and aborts between
decoder / encoder blocks, not only between tiles; the tile-unit contract is unchanged."""

from pathlib import Path

import pytest
import torch

from lens_model.vae import Flux2VAE, Flux2VAEConfig

from lens_model.vae_loading import inspect_vae

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"


@pytest.fixture(scope="module")
def vae() -> Flux2VAE:
    """Default-initialised 2-level VAE (x4 per latent cell), one resnet per encoder level."""
    torch.manual_seed(0)
    model = Flux2VAE(Flux2VAEConfig(block_out_channels=(32, 64), layers_per_block=1)).eval()
    model.bn.running_var.uniform_(0.5, 1.5)
    return model


# Counted from the architecture: decoder = mid (resnet, attention, resnet) + per level
# (layers_per_block + 1) resnets + an upsampler on every level but the last; encoder = per level
# layers_per_block resnets + a downsampler on every level but the last + the mid block.
DECODER_BLOCKS = 3 + 2 * 2 + 1
ENCODER_BLOCKS = 2 * 1 + 1 + 3


def test_decode_reports_every_block_and_gives_the_same_image(vae):
    z = torch.randn(2, 128, 8, 6, generator=torch.Generator().manual_seed(3))
    calls = []
    out = vae.decode(z, tile=False, callback=lambda d, t: calls.append((d, t)), progress_unit="block")
    total = 2 * DECODER_BLOCKS
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert torch.equal(out, vae.decode(z, tile=False))
    calls.clear()
    vae.decode(z[:1], tile=True, tile_size=4, overlap=2, callback=lambda d, t: calls.append((d, t)),
               progress_unit="block")
    total = 6 * DECODER_BLOCKS  # 3 x 2 tiles
    assert calls == [(i, total) for i in range(1, total + 1)]
    with pytest.raises(ValueError, match="progress_unit"):
        vae.decode(z, progress_unit="layer")


def test_encode_reports_every_block(vae):
    img = torch.rand(2, 32, 24, 3, generator=torch.Generator().manual_seed(1))
    calls = []
    lat = vae.encode(img, callback=lambda d, t: calls.append((d, t)), progress_unit="block")
    total = 2 * ENCODER_BLOCKS
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert torch.equal(lat, vae.encode(img))


def test_abort_inside_a_pass_stops_between_blocks(vae):
    """A callback that raises at block 2 stops the decoder there: later blocks never run."""
    z = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0))
    ran = []
    hooks = [blk.register_forward_hook(lambda m, i, o: ran.append(m)) for lv in vae.decoder.up for blk in lv.block]

    class Stop(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Stop

    try:
        with pytest.raises(Stop):
            vae.decode(z, tile=False, callback=stop, progress_unit="block")
    finally:
        for h in hooks:
            h.remove()
    assert ran == []  # stopped inside the mid block, before any up-level resnet
    assert vae.decode(z, tile=False).shape == (1, 16, 16, 3)  # ready to run again


def test_inspect_vae_reads_headers_only():
    cfg = inspect_vae(GOLDEN / "vae")
    assert cfg.block_out_channels == (32, 32, 32, 64) and cfg.bn_channels == 128
