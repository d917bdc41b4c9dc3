"""Checkpoint resolution, header reading, prefix stripping, detection and error messages."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import GOLDEN
import writers
from lens_model import checkpoints
from lens_model.checkpoints import CheckpointError, open_checkpoint

DIT_FILE = GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors"


def test_dit_folder_and_prefixed_bf16_file_have_the_same_bare_keys():
    folder = open_checkpoint(GOLDEN / "transformer", "dit")
    single = open_checkpoint(GOLDEN / "lens_tiny_comfy_bf16.safetensors", "dit")
    assert folder.prefix == "" and single.prefix == "model.diffusion_model."
    assert sorted(folder.keys()) == sorted(single.keys()) and len(folder) == 68
    assert folder.config["_class_name"] == "LensTransformer2DModel"
    assert single.config is None
    assert single.dtype("img_in.weight") == "BF16"
    assert single.stored_key("img_in.weight") == "model.diffusion_model.img_in.weight"


def test_read_equals_safetensors_library():
    src = open_checkpoint(DIT_FILE, "dit")
    with safe_open(DIT_FILE, "pt") as f:
        for key in ("img_in.weight", "txt_norm.0.weight", "transformer_blocks.1.img_mlp.w2.weight"):
            assert torch.equal(src.read(key), f.get_tensor(key))
    assert src.read("img_in.weight", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_read_rows_reads_only_the_requested_rows():
    src = open_checkpoint(GOLDEN / "text_encoder", "te")
    full = src.read("embed_tokens.weight")
    idx = torch.tensor([[5, 3, 5], [0, 511, 7]])
    assert torch.equal(src.read_rows("embed_tokens.weight", idx), full[idx])


def test_read_rows_of_a_file_truncated_after_opening_raises(tmp_path):
    f = tmp_path / "table.safetensors"
    save_file({"table": torch.arange(40, dtype=torch.float32).reshape(10, 4)}, str(f))
    infos, meta = checkpoints.read_safetensors_header(f)
    src = checkpoints.TensorSource([f], tmp_path, str(f), infos, meta, "", None)
    assert src.read_rows("table", torch.tensor([9]))[0].tolist() == [36.0, 37.0, 38.0, 39.0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 8])  # the last row is now half missing
    with pytest.raises(CheckpointError, match="table.safetensors"):
        src.read_rows("table", torch.tensor([9]))
    with pytest.raises(CheckpointError, match="table.safetensors"):
        src.read("table")


def test_pipeline_root_resolves_component_subfolders(tmp_path):
    root = tmp_path / "Lens-Diffusers"
    root.mkdir()
    (root / "model_index.json").write_text("{}")
    shutil.copytree(GOLDEN / "transformer", root / "transformer")
    shutil.copytree(GOLDEN / "vae", root / "vae")
    assert open_checkpoint(root, "dit").root == root / "transformer"
    assert open_checkpoint(root, "vae").root == root / "vae"


def test_te_prefix_and_unprefixed_lm_head():
    src = open_checkpoint(GOLDEN / "text_encoder", "te")
    assert src.prefix == "model."
    assert "layers.0.self_attn.sinks" in src and "lm_head.weight" in src
    assert src.config["model_type"] == "gpt_oss"


def _split_into_shards(tmp_path, source_file, n=2):
    with safe_open(source_file, "pt") as f:
        keys = sorted(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        save_file(part, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(GOLDEN / "transformer" / "config.json", tmp_path / "config.json")
    return tensors


def test_sharded_folder_index_and_shard_file_resolve_to_the_whole_set(tmp_path):
    tensors = _split_into_shards(tmp_path, DIT_FILE)
    for target in (tmp_path, tmp_path / "diffusion_pytorch_model.safetensors.index.json",
                   tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"):
        src = open_checkpoint(target, "dit")
        assert len(src.files) == 2 and sorted(src.keys()) == sorted(tensors)
        assert torch.equal(src.read("proj_out.weight"), tensors["proj_out.weight"])
        assert src.config is not None


def test_missing_shard_is_named(tmp_path):
    _split_into_shards(tmp_path, DIT_FILE)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002.safetensors.*not in"):
        open_checkpoint(tmp_path, "dit")


@pytest.mark.parametrize(
    "path,component,words",
    [
        (GOLDEN / "text_encoder", "dit", ["gpt-oss text encoder", "models/text_encoders"]),
        (GOLDEN / "vae", "dit", ["FLUX.2 VAE", "models/vae"]),
        (DIT_FILE, "vae", ["Lens diffusion model", "models/diffusion_models"]),
        (DIT_FILE, "te", ["Lens diffusion model", "not the gpt-oss-20b text encoder"]),
    ],
)
def test_wrong_component_is_refused_with_a_helpful_message(path, component, words):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path, component)
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)


def test_flux1_vae_is_named(tmp_path):
    f = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3), "encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(f))
    with pytest.raises(CheckpointError, match="without FLUX.2 batch-norm"):
        open_checkpoint(f, "vae")


def test_truncated_file(tmp_path):
    f = tmp_path / "lens_turbo_bf16.safetensors"
    data = DIT_FILE.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(f, "dit")
    f.write_bytes(data[:6])
    with pytest.raises(CheckpointError, match="incomplete download"):
        open_checkpoint(f, "dit")


def test_gguf_and_pickle_are_refused(tmp_path):
    g = tmp_path / "lens-Q4_K.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="GGUF files are not supported"):
        open_checkpoint(g, "dit")
    g2 = tmp_path / "renamed.safetensors"
    g2.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="GGUF"):
        open_checkpoint(g2, "dit")
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="safetensors"):
        open_checkpoint(p, "dit")
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "nope.safetensors", "dit")


def test_quant_layers_from_markers_and_metadata(tmp_path):
    with safe_open(DIT_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["proj_out.comfy_quant"] = writers.comfy_quant_tensor({"format": "mxfp8"})
    tensors["img_in.comfy_quant"] = writers.comfy_quant_tensor({"format": "float8_e4m3fn"})
    prefixed = {"model.diffusion_model." + k: v for k, v in tensors.items()}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        "model.diffusion_model.img_in": {"format": "mxfp8"}}})}
    f = tmp_path / "q.safetensors"
    writers.write_safetensors(f, prefixed, meta)
    layers = checkpoints.quant_layers(open_checkpoint(f, "dit"))
    assert layers == {"proj_out": {"format": "mxfp8"}, "img_in": {"format": "mxfp8"}}


def test_writer_round_trips_float8_and_is_readable_by_safetensors(tmp_path):
    t = {"a": torch.randn(3, 4).to(torch.float8_e4m3fn), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16()}
    f = tmp_path / "w.safetensors"
    writers.write_safetensors(f, t, {"k": "v"})
    with safe_open(f, "pt") as g:
        for k in t:
            assert torch.equal(g.get_tensor(k).view(torch.uint8), t[k].view(torch.uint8))
        assert g.metadata() == {"k": "v"}
    infos, meta = checkpoints.read_safetensors_header(f)
    assert infos["a"].dtype == "F8_E4M3" and meta == {"k": "v"}


def test_identity_changes_when_the_file_changes(tmp_path):
    f = tmp_path / "x.safetensors"
    shutil.copy(DIT_FILE, f)
    before = checkpoints.path_identity(f)
    os.utime(f, ns=(1, 1))
    assert checkpoints.path_identity(f) != before


def test_header_length_starting_with_pickle_byte_is_still_safetensors(tmp_path):
    # a valid header whose length's low byte is 0x80 must not be mistaken for a pickle
    f = tmp_path / "x.safetensors"
    for pad in range(300):
        writers.write_safetensors(f, {"a": torch.zeros(2)}, {"p": "x" * pad})
        if f.read_bytes()[:1] == b"\x80":
            break
    assert f.read_bytes()[:1] == b"\x80"
    infos, meta = checkpoints.read_safetensors_header(f)
    assert infos["a"].shape == (2,)


# -- memory-mapped tensors -------------------------------------------------------------------------

def _mapped_files(t: torch.Tensor) -> list[str]:
    """Paths of the /proc/self/maps entries that contain the tensor's first byte."""
    addr = t.data_ptr()
    hits = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                hits.append(parts[5] if len(parts) > 5 else "")
    return hits


def _mixed_file(tmp_path):
    tensors = {
        "big": torch.randn(300, 1000),  # first, so aligned: spans several pages and allocation granules
        "odd": torch.arange(7, dtype=torch.uint8),  # leaves the next tensor at an odd file offset
        "bf16": torch.randn(33, 17).bfloat16(),
        "f32": torch.randn(5, 3),
        "f8": (torch.randn(4, 8) * 3).to(torch.float8_e4m3fn),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    f = tmp_path / "mixed.safetensors"
    writers.write_safetensors(f, tensors)
    return f, tensors


def test_read_returns_the_stored_bytes_of_every_dtype(tmp_path):
    f, tensors = _mixed_file(tmp_path)
    src = checkpoints.TensorSource([f], tmp_path, str(f), checkpoints.read_safetensors_header(f)[0], {}, "", None)
    for key, want in tensors.items():
        r = src.read(key)
        assert r.dtype == want.dtype and r.shape == want.shape, key
        assert torch.equal(r.view(torch.uint8), want.view(torch.uint8)), key
    dit = open_checkpoint(GOLDEN / "lens_tiny_comfy_bf16.safetensors", "dit")
    with pytest.raises(KeyError, match="missing"):
        dit.read("nope.weight")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mapped_tensor_lives_in_the_file_and_is_unmapped_when_freed(tmp_path):
    f, tensors = _mixed_file(tmp_path)
    src = checkpoints.TensorSource([f], tmp_path, str(f), checkpoints.read_safetensors_header(f)[0], {}, "", None)
    t = src.read("big")
    assert _mapped_files(t) == [str(f)]
    addr = t.data_ptr()
    t.mul_(2.0)  # writes stay private (MAP_PRIVATE): the file is unchanged
    assert torch.equal(src.read("big"), tensors["big"])
    view = t[10:20]
    del t
    assert _mapped_files(view) == [str(f)]  # a view keeps the mapping alive
    del view
    import gc
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert not any(
            int(line.split("-")[0], 16) <= addr < int(line.split()[0].split("-")[1], 16) and str(f) in line
            for line in maps
        )


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="Linux mmap semantics")
def test_mapped_tensor_survives_a_replaced_file_but_not_an_in_place_rewrite(tmp_path):
    """The documented contract of TensorSource.read: replacing the file (new inode) is safe; rewriting
    it in place shows the new bytes through pages the process has not written."""
    f, tensors = _mixed_file(tmp_path)
    src = checkpoints.TensorSource([f], tmp_path, str(f), checkpoints.read_safetensors_header(f)[0], {}, "", None)
    t = src.read("big")
    other = {k: (v * 0 if v.is_floating_point() and v.dtype != torch.float8_e4m3fn else v) for k, v in tensors.items()}
    writers.write_safetensors(f, other)  # writes a temporary file and renames it over `f`
    assert torch.equal(t, tensors["big"])
    f.unlink()
    assert torch.equal(t, tensors["big"])

    g, _ = _mixed_file(tmp_path)
    src = checkpoints.TensorSource([g], tmp_path, str(g), checkpoints.read_safetensors_header(g)[0], {}, "", None)
    t = src.read("big")
    start = g.read_bytes().find(t.numpy().tobytes())
    assert start > 0
    with open(g, "r+b") as fh:  # in place: same inode
        fh.seek(start)
        fh.write(torch.zeros(300, 1000).numpy().tobytes())
    assert t.abs().sum() == 0


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        writers.write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_identity_of_a_shard_covers_its_whole_set(tmp_path):
    for i in (1, 2):
        (tmp_path / f"model-0000{i}-of-00002.safetensors").write_bytes(b"x" * i)
    first = tmp_path / "model-00001-of-00002.safetensors"
    before = checkpoints.checkpoint_identity(first)
    assert before == (str(tmp_path), 3, before[2])
    second = tmp_path / "model-00002-of-00002.safetensors"
    second.write_bytes(b"yyyy")  # another shard replaced: the first shard's identity changes
    st = os.stat(second)
    os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert checkpoints.checkpoint_identity(first) != before
    single = tmp_path / "single.safetensors"
    single.write_bytes(b"abc")
    assert checkpoints.checkpoint_identity(single)[:2] == (str(single), 3)


def test_checkpoint_bytes_counts_safetensors_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 100)
    assert checkpoints.checkpoint_bytes(tmp_path) == 15
    assert checkpoints.checkpoint_bytes(tmp_path / "a.safetensors") == 10
    assert checkpoints.checkpoint_bytes(tmp_path / "missing.safetensors") == 0


def test_list_checkpoints_shows_folders_once_and_shard_sets_once(tmp_path):
    root = tmp_path / "diffusion_models"
    pipe = root / "Lens-Diffusers" / "transformer"
    pipe.mkdir(parents=True)
    (pipe / "config.json").write_text("{}")
    component = root / "dit-folder"
    component.mkdir()
    (component / "config.json").write_text("{}")
    (component / "w.safetensors").write_bytes(b"x")
    (root / "plain").mkdir()  # a plain sub-folder: its files stay listed
    (root / ".hidden").mkdir()
    (root / ".hidden" / "config.json").write_text("{}")
    files = ["Lens-Diffusers/transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
             "dit-folder/w.safetensors", "plain/lens.safetensors", "z.safetensors", "a.gguf",
             "index.json", "big-00001-of-00002.safetensors", "big-00002-of-00002.safetensors"]
    assert checkpoints.list_checkpoints(files, [str(root), str(tmp_path / "missing")], "dit") == [
        "Lens-Diffusers/", "dit-folder/", "big-00001-of-00002.safetensors",
        "plain/lens.safetensors", "z.safetensors"]
    # a pipeline root counts only for the component whose sub-folder it has
    assert checkpoints.list_checkpoints([], [str(root)], "vae") == ["dit-folder/"]
