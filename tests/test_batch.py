"""Batch generation (lens_model.batch): prompts-file parsing, the in-process runner against the
command-line tool on tiny weights (byte-identical PNGs), the feature cache and resuming."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from lens_model import batch, cli
from test_cli import GOLDEN, tiny_te  # noqa: F401  (tiny_te: a module fixture, a TE fitting the tiny DiT)

DEFAULTS = batch.RowDefaults(variant="lens", width=64, height=64)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ parsing

def test_load_rows_defaults_and_bad_lines(tmp_path, caplog):
    src = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a fox", "id": "fox"},
        "{not json",
        {"negative": "blurry"},
        {"prompt": "a cat", "width": 64},
        {"prompt": "a cat", "width": 100, "height": 64},
        {"prompt": "a cat", "seed": -1},
        {"prompt": "a cat", "id": "../evil"},
        "",
        {"prompt": "an owl", "id": "fox"},
        {"prompt": "an owl", "variant": "turbo", "cfg": 2, "caption_src": "web"},
        {"prompt": "an owl", "variant": "turbo", "cfg": 2},
        {"prompt": "a cat", "steps": 500},
        {"prompt": "a cat", "cfg": float("nan")},
        {"prompt": "a cat", "lora": {"x": 1}},
    ])
    rows, errors = batch.load_rows(src, DEFAULTS)
    assert [e.line for e in errors] == [2, 3, 4, 5, 6, 7, 9, 11, 12, 13, 14]
    msgs = {e.line: e.message for e in errors}
    assert "JSON" in msgs[2] and "prompt" in msgs[3] and "both width and height" in msgs[4]
    assert "100" in msgs[5] and "seed" in msgs[6] and "../evil" in msgs[7]
    assert "line 1" in msgs[9] and "same parameters" in msgs[11]
    assert "steps" in msgs[12] and "500" in msgs[12] and "cfg" in msgs[13]
    assert "FILE[:STRENGTH]" in msgs[14]
    fox, owl = rows
    # the command-line tool's defaults: seed 0, the job's size, steps/cfg of the variant
    assert (fox.id, fox.seed, fox.width, fox.height, fox.steps, fox.cfg, fox.negative) == \
        ("fox", 0, 64, 64, 20, 5.0, "")
    assert (owl.variant, owl.steps, owl.cfg, owl.lora, owl.line) == ("turbo", 4, 2.0, None, 10)
    assert owl.id.startswith("p") and len(owl.id) == 17        # digest of the parameters
    assert "caption_src" in caplog.text


def test_texts_to_encode_skips_negatives_at_cfg_1():
    rows = [batch.parse_row({"prompt": "a", "negative": "n1", "cfg": 1}, 1, DEFAULTS),
            batch.parse_row({"prompt": "a", "negative": "n2", "seed": 1}, 2, DEFAULTS),
            batch.parse_row({"prompt": "b", "negative": " ", "seed": 2}, 3, DEFAULTS)]
    assert batch.texts_to_encode(rows) == ["a", "n2", "b"]


def test_group_rows_by_size():
    rows = [batch.parse_row({"prompt": str(i), "width": w, "height": 64}, i, DEFAULTS)
            for i, w in enumerate([64, 32, 64, 64, 32])]
    groups = batch.group_rows(rows, 2)
    assert [[r.prompt for r in g] for g in groups] == [["0", "2"], ["3"], ["1", "4"]]


def test_progress_lines_rate_and_stage_utilisation(caplog):
    now = [100.0]
    progress = batch.Progress(total=5, skipped=1, workers={"dit": 2}, interval=10.0,
                              clock=lambda: now[0])
    rec = {"encode_s": 3.0, "dit_s": 12.0, "vae_s": 1.5, "write_s": 0.5}
    caplog.set_level("INFO", logger="lens_model.batch")
    now[0] = 130.0                                   # 30 s in: the first image is logged
    progress.add(rec)
    now[0] = 135.0                                   # 5 s later: too soon for a line
    progress.add(dict(rec, encode_s=0.0))
    now[0] = 160.0                                   # 60 s in, 25 s after the last line
    progress.add(dict(rec, encode_s=0.0))
    lines = [r.getMessage() for r in caplog.records]
    # 2/5 at 30 s: 1 image in 0.5 min; encode 3 s of 30, dit 12 s over 2 workers of 30 s,
    # vae 1.5 s, write 0.5 s
    assert lines[0] == "2/5 rows done, 2.0 images/min, busy: encode 10 %, dit 20 %, vae 5 %, write 2 %"
    # 4/5 at 60 s: 3 images in 1 min; encode 3 of 60, dit 36 of 2 × 60, vae 4.5, write 1.5
    assert lines[1] == "4/5 rows done, 3.0 images/min, busy: encode 5 %, dit 30 %, vae 8 %, write 2 %"
    now[0] = 161.0
    progress.add(dict(rec, encode_s=0.0))           # the last row is always logged
    assert caplog.records[-1].getMessage().startswith("5/5 rows done")
    assert len(caplog.records) == 3
    assert progress.summary().startswith("4 image(s) in 61.0 s; stage seconds summed over workers: "
                                         "encode 3.0 s (5 % busy), dit 48.0 s (39 % busy)")


# -------------------------------------------------------------------------- end to end, tiny

ROWS = [
    {"id": "fox", "prompt": "a red fox in the snow", "seed": 3, "steps": 2, "width": 64,
     "height": 64},
    {"id": "fox2", "prompt": "a red fox in the snow", "seed": 4, "steps": 2, "width": 64,
     "height": 64, "negative": "blurry"},
    "{broken",
    {"id": "owl", "prompt": "an owl", "seed": 5, "steps": 2, "cfg": 1.0, "negative": "blurry",
     "width": 48, "height": 64},
]


def _files(tiny_te):
    return ["--transformer", str(GOLDEN / "transformer"), "--text-encoder", str(tiny_te),
            "--vae", str(GOLDEN / "vae"), "--device", "cpu", "--no-download", "-q"]


def _cli_png(tmp_path, tiny_te, row) -> bytes:
    out = tmp_path / f"cli_{row['id']}.png"
    argv = [row["prompt"], "-o", str(out), "--seed", str(row["seed"]), "--steps",
            str(row["steps"]), "--width", str(row["width"]), "--height", str(row["height"])] + _files(tiny_te)
    if "cfg" in row:
        argv += ["--cfg", str(row["cfg"])]
    if "negative" in row:
        argv += ["--negative", row["negative"]]
    assert cli.main(argv) == 0
    return out.read_bytes()


@pytest.fixture(scope="module")
def cli_pngs(tmp_path_factory, tiny_te):  # noqa: F811
    tmp = tmp_path_factory.mktemp("cli")
    return {r["id"]: _cli_png(tmp, tiny_te, r) for r in ROWS if isinstance(r, dict)}


def _run(tmp_path, tiny_te, out, *extra):  # noqa: F811
    src = _write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    return batch.main([str(src), "--out", str(out)] + _files(tiny_te)
                      + list(extra))


def test_batch_in_process_matches_cli_and_resumes(tmp_path, tiny_te, cli_pngs, monkeypatch,  # noqa: F811
                                                  capsys, caplog):
    caplog.set_level("INFO", logger="lens_model.batch")

    loads = []
    real_load = batch.load_text_encoder
    monkeypatch.setattr(batch, "load_text_encoder",
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "out"
    assert _run(tmp_path, tiny_te, out, "--variant", "lens") == 1      # one bad row
    assert "prompts.jsonl: line 3:" in capsys.readouterr().err
    progress = [r.getMessage() for r in caplog.records if "rows done" in r.getMessage()]
    assert progress[0].startswith("1/3 rows done") and progress[-1].startswith("3/3 rows done")
    assert "busy: encode" in progress[-1] and "dit" in progress[-1]
    for rid, want in cli_pngs.items():
        assert (out / f"{rid}.png").read_bytes() == want, rid
    # two distinct prompts + one negative (the owl's is not needed at CFG 1): three cache files,
    # one text-encoder load
    assert len(list((out / ".lens_features").rglob("*.safetensors"))) == 3
    assert len(loads) == 1
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["fox", "fox2", "owl"]
    for r in records:
        assert r["sha256"] == hashlib.sha256((out / r["file"]).read_bytes()).hexdigest()
        assert r["model"] == "transformer" and r["steps"] == 2 and r["lora"] is None
        assert all(r[k] >= 0 for k in batch.STAGE_FIELDS)
    assert records[2]["cfg"] == 1.0 and (records[2]["width"], records[2]["height"]) == (48, 64)

    # a rerun finds everything done: no encoder, no DiT, files untouched
    monkeypatch.setattr(batch, "DiTStage", lambda *a: pytest.fail("DiT loaded on a rerun"))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert _run(tmp_path, tiny_te, out, "--variant", "lens") == 1
    assert len(loads) == 1
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes

    # a changed job parameter (the schedule shift) makes every row due again
    result_rows, _ = batch.load_rows(tmp_path / "prompts.jsonl", DEFAULTS)
    job = batch.JobSettings(transformer=str(GOLDEN / "transformer"), text_encoder=str(tiny_te),
                            vae=str(GOLDEN / "vae"), out_dir=str(out),
                            cache_dir=str(out / ".lens_features"), device="cpu", mu=0.5)
    _, todo, done = batch.plan(result_rows, job)
    assert (len(todo), done) == (3, [])


def test_batch_parquet_in_and_out(tmp_path, tiny_te, cli_pngs):  # noqa: F811
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [r for r in ROWS if isinstance(r, dict)][:1]
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(src))
    out = tmp_path / "pq"
    assert batch.main([str(src), "--out", str(out), "--variant", "lens"] + _files(tiny_te)) == 0
    assert (out / "fox.png").read_bytes() == cli_pngs["fox"]
    table = pq.read_table(str(out / "manifest.parquet")).to_pylist()
    assert [r["id"] for r in table] == ["fox"]
    assert table[0]["sha256"] == hashlib.sha256(cli_pngs["fox"]).hexdigest()
    assert list(table[0]) == batch.manifest_columns()


# ------------------------------------------------------------------------------- Ray Data path

@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for this module's Ray tests."""
    ray = pytest.importorskip("ray", reason="ray is an optional extra (pip install 'lens-nodes[batch]')")
    # a private session folder (short: it holds unix sockets), so that a Ray started by another
    # test run on the same machine is never joined or confused with this one
    temp = tempfile.mkdtemp(prefix="lensray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_batch_on_ray_survives_a_killed_worker(tmp_path, tiny_te, cli_pngs, ray_local,  # noqa: F811
                                               capsys):
    from lens_model import batch_ray

    src = _write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    rows, errors = batch.load_rows(src, DEFAULTS)
    assert [e.line for e in errors] == [3]
    out = tmp_path / "ray"
    # the actors open the output folder from its URI (pyarrow.fs), as they would an s3:// one
    job = batch.JobSettings(transformer=str(GOLDEN / "transformer"), text_encoder=str(tiny_te),
                            vae=str(GOLDEN / "vae"), out_dir=f"file://{out}", device="cpu")
    marker = tmp_path / "killed"
    opts = batch_ray.RayOptions(fault_marker=str(marker))
    result = batch_ray.run_on_ray(rows, job, opts, dit_batch=2)
    assert marker.exists()                             # a DiT worker did die mid-job
    assert sorted(result.written) == ["fox", "fox2", "owl"] and result.encoded == 3
    for rid, want in cli_pngs.items():
        assert (out / f"{rid}.png").read_bytes() == want, rid
    ids = [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert ids == ["fox", "fox2", "owl"]               # every image once

    # the same command line with --ray finds everything done
    assert _run(tmp_path, tiny_te, out.parent / "ray", "--variant", "lens", "--ray", "local") == 1
    assert "line 3" in capsys.readouterr().err
    assert [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()] == ids


def test_batch_bad_files_and_options_fail_before_any_work(tmp_path, tiny_te, capsys):  # noqa: F811
    src = _write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "out"
    argv = [str(src), "--out", str(out)] + _files(tiny_te)
    bad = list(argv)
    bad[bad.index("--vae") + 1] = str(tmp_path / "missing.safetensors")
    assert batch.main(bad) == 2
    assert "--vae" in capsys.readouterr().err
    wrong = list(argv)
    wrong[wrong.index("--vae") + 1] = str(GOLDEN / "transformer")   # a DiT given as the VAE
    assert batch.main(wrong) == 2
    assert "--vae" in capsys.readouterr().err
    assert batch.main(argv + ["--dit-batch", "0"]) == 2
    assert batch.main(argv + ["--progress-every", "nan"]) == 2
    assert "--progress-every" in capsys.readouterr().err
    assert not out.exists()


def test_every_option_is_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Batch generation"):]
    section = section[:section.index("\n## ", 3)]
    for action in batch.build_parser()._actions:
        for opt in action.option_strings:
            if opt not in ("-h", "--help"):
                assert opt in section, opt


def test_without_ray_installed_local_runs_in_process(tmp_path, tiny_te, cli_pngs, monkeypatch,  # noqa: F811
                                                     caplog):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    src = _write_jsonl(tmp_path / "p.jsonl", [r for r in ROWS if isinstance(r, dict)][:1])
    out = tmp_path / "noray"
    argv = [str(src), "--out", str(out), "--variant", "lens"] + _files(tiny_te)
    assert batch.main(argv + ["--ray", "10.0.0.1:6379"]) == 2     # a cluster address needs ray
    assert not (out / "fox.png").exists()
    assert batch.main(argv + ["--ray", "local"]) == 0
    assert "running in-process" in caplog.text
    assert (out / "fox.png").read_bytes() == cli_pngs["fox"]


def test_batch_lora_rows_match_the_cli(tmp_path, tiny_te, capsys):  # noqa: F811
    import torch
    from test_lora import _save, factors, write_layout

    lora_path, _ = write_layout(tmp_path, "loboforge", factors(7))
    wrong = _save(tmp_path, {   # a full-size DiT's LoRA: does not fit the tiny DiT
        "lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight": torch.zeros(16, 1536),
        "lora_unet_transformer_blocks_0_attn_img_qkv.lora_up.weight": torch.zeros(4608, 16)},
        "full_size.safetensors")
    base = {"prompt": "a fox", "seed": 4, "steps": 2, "cfg": 1.0, "width": 64, "height": 64}
    src = _write_jsonl(tmp_path / "p.jsonl", [
        dict(base, id="lora", lora=f"{lora_path}:0.6"),
        dict(base, id="plain"),
        dict(base, id="wrong", lora=[str(wrong)]),
        dict(base, id="missing", lora=str(tmp_path / "nope.safetensors")),
    ])
    out = tmp_path / "out"
    assert batch.main([str(src), "--out", str(out), "--variant", "lens"] + _files(tiny_te)) == 1
    err = capsys.readouterr().err
    assert "line 3: --lora" in err and "full_size" in err and "line 4: lora" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["lora.png", "plain.png"]
    want = tmp_path / "cli.png"
    argv = ["a fox", "-o", str(want), "--seed", "4", "--steps", "2", "--cfg", "1", "--width", "64",
            "--height", "64", "--lora", f"{lora_path}:0.6"] + _files(tiny_te)
    assert cli.main(argv) == 0
    assert (out / "lora.png").read_bytes() == want.read_bytes()
    assert (out / "lora.png").read_bytes() != (out / "plain.png").read_bytes()
    rec = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()][0]
    assert rec["id"] == "lora" and json.loads(rec["lora"]) == [f"{lora_path}:0.6"]


# ------------------------------------------------------------- output on any pyarrow filesystem

def test_batch_writes_to_a_file_uri_and_to_a_pyarrow_filesystem(tmp_path, tiny_te, cli_pngs,  # noqa: F811
                                                                monkeypatch):
    pafs = pytest.importorskip("pyarrow.fs")
    src = _write_jsonl(tmp_path / "p.jsonl", [r for r in ROWS if isinstance(r, dict)][:1])
    out = tmp_path / "uri out"
    uri = "file://" + str(out).replace(" ", "%20")
    assert batch.main([str(src), "--out", uri, "--variant", "lens"] + _files(tiny_te)) == 0
    assert (out / "fox.png").read_bytes() == cli_pngs["fox"]
    assert json.loads((out / "manifest.jsonl").read_text())["bytes"] == len(cli_pngs["fox"])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # an in-memory filesystem under a sub-tree: images, manifest and feature cache all go there
    mock = pafs._MockFileSystem()
    fs = pafs.SubTreeFileSystem("bucket", mock)
    rows, _ = batch.load_rows(src, DEFAULTS)
    job = batch.JobSettings(transformer=str(GOLDEN / "transformer"), text_encoder=str(tiny_te),
                            vae=str(GOLDEN / "vae"), out_dir="run1", filesystem=fs)
    result = batch.run_in_process(rows, job)
    assert result.written == ["fox"] and result.encoded == 1

    def read(path):
        with mock.open_input_stream(path) as f:
            return f.read()

    assert read("bucket/run1/fox.png") == cli_pngs["fox"]
    rec = json.loads(read("bucket/run1/manifest.jsonl"))
    assert rec["sha256"] == hashlib.sha256(cli_pngs["fox"]).hexdigest()
    names = [i.path for i in mock.get_file_info(pafs.FileSelector("bucket", recursive=True))]
    assert any(n.startswith("bucket/run1/.lens_features/") and n.endswith(".safetensors")
               for n in names)
    assert not [n for n in names if n.endswith(".tmp")]

    # a rerun on that filesystem finds the image done: no model loads
    monkeypatch.setattr(batch, "EncodeStage", lambda *a: pytest.fail("encoder on a rerun"))
    monkeypatch.setattr(batch, "DiTStage", lambda *a: pytest.fail("DiT loaded on a rerun"))
    assert batch.run_in_process(rows, job).skipped == ["fox"]


class _ObjectStoreHandler:
    """An fsspec memory filesystem that presents itself as S3 (one PUT per object, no append), and
    records the calls it gets."""

    @staticmethod
    def make():
        fsspec = pytest.importorskip("fsspec")
        pafs = pytest.importorskip("pyarrow.fs")
        calls = []

        class Handler(pafs.FSSpecHandler):
            def get_type_name(self):
                return "fsspec+s3"

            def open_append_stream(self, path, metadata):
                raise NotImplementedError("no append on an object store")

            def move(self, src, dest):
                calls.append(("move", src, dest))
                return super().move(src, dest)

            def open_input_stream(self, path):
                calls.append(("read", path))
                return super().open_input_stream(path)

        return pafs.PyFileSystem(Handler(fsspec.filesystem("memory"))), calls


def test_output_store_on_an_object_store(tmp_path):
    from lens_model.batch_store import OutputStore

    fs, calls = _ObjectStoreHandler.make()
    root = f"/{tmp_path.name}/run"          # the memory filesystem is shared by the process
    store = OutputStore(root, fs)
    assert store.atomic_put and store.local_path() is None
    store.write("a.png", b"png-bytes")
    assert store.read("a.png") == b"png-bytes" and store.size("missing") is None
    assert not [c for c in calls if c[0] == "move"]                  # one PUT, no temp name
    assert store.append("log", "x") is False and store.size("log") is None

    # the manifest is written whole: at most every flush_every seconds, and at the end
    manifest = batch.Manifest(store, flush_every=3600)
    rec = {"id": "a", "file": "a.png", "sha256": hashlib.sha256(b"png-bytes").hexdigest(),
           "bytes": 9, "seed": 1}
    manifest.add(rec)
    assert store.size(batch.MANIFEST_JSONL) is None
    manifest.finish(["a"])
    assert json.loads(store.read(batch.MANIFEST_JSONL)) == rec
    manifest = batch.Manifest(store, flush_every=0)
    manifest.add(dict(rec, id="b", file="b.png"))
    assert len(store.read(batch.MANIFEST_JSONL).splitlines()) == 2

    # resuming checks the listed size; the image is not downloaded again
    calls.clear()
    resumed = batch.Manifest(store)
    assert resumed.matches("a", {"seed": 1}) and not resumed.matches("a", {"seed": 2})
    assert not resumed.matches("b", {"seed": 1})                    # its file is not there
    assert [c for c in calls if c[0] == "read"] == [("read", f"{root}/manifest.jsonl")]
    store.write("a.png", b"other")                                   # replaced: size differs
    assert not batch.Manifest(store).matches("a", {"seed": 1})


def test_output_store_without_pyarrow_is_local_only(tmp_path, monkeypatch):
    import sys

    from lens_model.batch_store import OutputStore

    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)
    store = OutputStore(tmp_path / "out")
    assert store.fs is None
    store.write("x/a.png", b"abc")
    assert store.append("m.jsonl", "1\n") and store.append("m.jsonl", "2\n")
    assert (tmp_path / "out" / "x" / "a.png").read_bytes() == b"abc"
    assert store.read("m.jsonl") == b"1\n2\n" and store.sizes() == {"m.jsonl": 4}
    assert store.sha256("x/a.png") == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(ValueError, match="'s3://bucket/run' is a URI: install pyarrow"):
        OutputStore("s3://bucket/run")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, tiny_te, capsys, monkeypatch):  # noqa: F811
    src = _write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    argv = [str(src), "--out", str(tmp_path / "out")] + _files(tiny_te)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_in_process", interrupted)
    assert batch.main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
