"""Resolution presets, size validation, jump warning and core empty-latent conversion."""

import pytest
import torch

from lens_model.constants import MAX_SIDE, RATIOS
from lens_model.resolution import (
    PRESET_SIZES, RELEASE_NOTES_PRESETS, crop_to_cells, default_base, empty_latent,
    latent_from_core_empty, presets, resolution_for, schedule_jump_warning, validate_size,
)

# Upstream's preset table, verbatim: ratio W:H -> (H x W, N image tokens) for base 1024 and 1440.
TABLE = {
    "1:2": ((1472, 736), 4232, (2080, 1040), 8450),
    "9:16": ((1376, 768), 4128, (1936, 1088), 8228),
    "2:3": ((1248, 832), 4056, (1760, 1168), 8030),
    "3:4": ((1152, 864), 3888, (1616, 1216), 7676),
    "1:1": ((1024, 1024), 4096, (1440, 1440), 8100),
    "4:3": ((864, 1152), 3888, (1216, 1616), 7676),
    "3:2": ((832, 1248), 4056, (1168, 1760), 8030),
    "16:9": ((768, 1376), 4128, (1088, 1936), 8228),
    "2:1": ((736, 1472), 4232, (1040, 2080), 8450),
}


@pytest.mark.parametrize("ratio", list(TABLE))
def test_presets_match_upstream_table(ratio):
    hw1024, n1024, hw1440, n1440 = TABLE[ratio]
    for base, (h, w), n in ((1024, hw1024, n1024), (1440, hw1440, n1440)):
        width, height = resolution_for(base, ratio)
        assert (height, width) == (h, w)
        assert (height // 16) * (width // 16) == n
        assert height % 16 == 0 and width % 16 == 0
        # W:H orientation: a ratio above 1 is landscape
        rw, rh = map(int, ratio.split(":"))
        assert (width > height) == (rw > rh) and (width == height) == (rw == rh)
        assert schedule_jump_warning(width, height) is None
        assert validate_size(width, height) == (width, height)


def test_preset_listing():
    assert len(presets()) == 18
    assert len(PRESET_SIZES) == 20
    assert set(RELEASE_NOTES_PRESETS) == {(1248, 1664), (1664, 1248)}
    assert (1248, 1664) in PRESET_SIZES


def test_shared_constants_agree_with_the_upstream_table():
    assert list(RATIOS) == list(TABLE)  # same ratios, portrait to landscape
    for base in (1024, 1440):
        assert [r for b, r, _, _ in presets() if b == base] == list(TABLE)
    assert MAX_SIDE == max(side for row in TABLE.values() for side in row[0] + row[2])


def test_default_base_is_1024_on_the_cpu_and_1440_elsewhere():
    assert default_base("cpu") == default_base(torch.device("cpu")) == 1024
    assert default_base("cuda") == default_base("meta") == 1440


def test_resolution_for_errors():
    with pytest.raises(ValueError, match="base"):
        resolution_for(2048, "1:1")
    with pytest.raises(ValueError, match="5:4"):
        resolution_for(1024, "5:4")


@pytest.mark.parametrize("w,h,bad", [(1000, 1024, "1000"), (1024, 1030, "1030"),
                                     (2096, 1024, "2096"), (0, 1024, "0"), (1024, -16, "-16")])
def test_validate_size_rejects(w, h, bad):
    with pytest.raises(ValueError, match=bad):
        validate_size(w, h)


def test_validate_size_accepts_edges():
    assert validate_size(16, 2080) == (16, 2080)
    assert validate_size(2080, 2080) == (2080, 2080)


def test_schedule_jump_warning_zone():
    assert schedule_jump_warning(1040, 1040) is None   # 4225 tokens: below the jump
    assert schedule_jump_warning(1040, 1056) is None   # 4290
    msg = schedule_jump_warning(1056, 1056)            # 4356
    assert msg and "4356" in msg
    assert schedule_jump_warning(1280, 1280) is not None  # 6400
    assert schedule_jump_warning(1392, 1392) is not None  # 87*87 = 7569 < 7676
    assert schedule_jump_warning(1408, 1408) is None   # 88*88 = 7744: 1440 regime
    assert schedule_jump_warning(1664, 1248) is None   # release-notes size, 8112 tokens


@pytest.mark.parametrize("px,lat", [
    (1448, 90),   # 181 / 2 = 90.5 -> 90 (ties to even): the template's 1448^2 gives 1440^2
    (1432, 90),   # 179 / 2 = 89.5 -> 90 (even)
    (1416, 88),   # 177 / 2 = 88.5 -> 88 (even)
    (1024, 64),   # 128 / 2 = 64
    (1040, 65),   # 130 / 2 = 65
    (1464, 92),   # 183 / 2 = 91.5 -> 92 (even)
])
def test_core_empty_latent_conversion(px, lat):
    core = {"samples": torch.zeros(2, 4, px // 8, 1024 // 8), "downscale_ratio_spacial": 8}
    out = latent_from_core_empty(core)
    assert out.shape == (2, 128, lat, 64) and out.dtype == torch.float32
    assert not out.any()


def test_core_latent_passthrough_and_rejects():
    lens = torch.randn(1, 128, 4, 5)
    assert torch.equal(latent_from_core_empty({"samples": lens}), lens)
    bad = {"samples": torch.ones(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="4 channels"):
        latent_from_core_empty(bad)
    with pytest.raises(ValueError, match="16 channels"):
        latent_from_core_empty({"samples": torch.randn(1, 16, 8, 8)})
    # no ratio key: core EmptyLatentImage default of 8
    assert latent_from_core_empty({"samples": torch.zeros(1, 4, 181, 181)}).shape == (1, 128, 90, 90)


def test_empty_latent_has_the_latent_grid_of_the_size():
    z = empty_latent(1440, 1024, batch=3)
    assert z.shape == (3, 128, 64, 90) and z.dtype == torch.float32 and not z.any()
    assert empty_latent(16, 32).shape == (1, 128, 2, 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        empty_latent(40, 32)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        empty_latent(32, 32, batch=0)


def test_crop_to_cells_centres_the_crop():
    img = torch.arange(2 * 37 * 50 * 3, dtype=torch.float32).reshape(2, 37, 50, 3)
    out = crop_to_cells(img)
    assert out.shape == (2, 32, 48, 3)
    # 5 spare rows: 2 above, 3 below; 2 spare columns: 1 on each side
    assert torch.equal(out, img[:, 2:34, 1:49])
    exact = img[:, :32, :48]
    assert crop_to_cells(exact) is exact
    with pytest.raises(ValueError, match="smaller than 16 pixels"):
        crop_to_cells(img[:, :15])
