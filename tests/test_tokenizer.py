"""Tokenizer and harmony template: ids, template lengths, truncation and tokenizer sources.

Every golden `tokenizer_cases.json` case must match exactly with each tokenizer source: the built-in
o200k_base fallback, a tokenizer.json file, and a `tokenizer_json` tensor embedded in a safetensors
file.
"""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from conftest import GOLDEN
from lens_model import tokenizer as tk

CASES = json.loads((GOLDEN / "tokenizer_cases.json").read_text(encoding="utf-8"))
LONG_CASE = max(CASES["cases"], key=lambda c: len(c["full_ids"]))
GOLDEN_DATE_IDS = [1323, 21, 12, 2922, 12, 1860]  # the ids of "2026-05-23" in o200k_harmony


def _write_embedded(path, json_text: str, extra: dict | None = None):
    data = torch.frombuffer(bytearray(json_text.encode("utf-8")), dtype=torch.uint8)
    tensors = {"tokenizer_json": data, "layers.0.self_attn.sinks": torch.zeros(4)}
    tensors.update(extra or {})
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def fallback():
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_json_text(fallback):
    return fallback.to_json()


@pytest.fixture(scope="module")
def sources(fallback, tokenizer_json_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_sources")
    (root / "pipe" / "tokenizer").mkdir(parents=True)  # diffusers layout, reused below
    json_file = root / "pipe" / "tokenizer" / "tokenizer.json"
    json_file.write_text(tokenizer_json_text, encoding="utf-8")
    (root / "te").mkdir()
    te_file = root / "te" / "gpt_oss_tiny.safetensors"
    _write_embedded(te_file, tokenizer_json_text)
    return {
        "root": root,
        "fallback": fallback,
        "tokenizer.json": tk.load_tokenizer(json_file),
        "embedded": tk.load_tokenizer(te_file),
    }


SOURCES = ["fallback", "tokenizer.json", "embedded"]


# --- template -------------------------------------------------------------------------------------


def test_template_string_is_exact():
    assert tk.render_template("{PROMPT}", "2026-05-23") == CASES["template"]
    assert tk.render_template("{PROMPT}") == CASES["template"]  # default date
    assert tk.render_template("a cat") == CASES["template"].replace("{PROMPT}", "a cat")
    assert "<|end|>\n<|start|>" not in CASES["template"]


def test_constants_match_golden():
    assert tk.PREFIX_LEN == CASES["prefix_len"] == len(CASES["prefix_ids"])
    assert tk.SUFFIX_LEN == len(CASES["suffix_ids"])
    assert tk.MAX_LENGTH == CASES["max_length"]
    assert tk.DEFAULT_DATE == "2026-05-23"
    assert tk.PAD_ID == 199999 == tk.HARMONY_SPECIAL_TOKENS["<|endoftext|>"]
    assert len(tk.HARMONY_SPECIAL_TOKENS) == 201088 - 199998
    assert tk.HARMONY_SPECIAL_TOKENS["<|reserved_200001|>"] == 200001
    assert tk.HARMONY_SPECIAL_TOKENS["<|start|>"] == 200006


# --- golden ids for every source ------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_golden_prefix_and_suffix(sources, name):
    tok = sources[name]
    assert tok.prefix_ids("2026-05-23") == CASES["prefix_ids"]
    assert tok.prefix_ids() == CASES["prefix_ids"]
    assert tok.suffix_ids == CASES["suffix_ids"]


@pytest.mark.parametrize("name", SOURCES)
def test_golden_cases(sources, name):
    tok = sources[name]
    for case in CASES["cases"]:
        prompt, date = case["prompt"], case["date"]
        full = tok.tokenize(prompt, date=date, max_length=None)
        assert full == case["full_ids"], prompt[:40]
        assert tok.encode_text(CASES["template"].replace("{PROMPT}", prompt)) == case["full_ids"]
        truncated = tok.tokenize(prompt, date=date, truncation="upstream")
        assert truncated == case["truncated_ids"], prompt[:40]
        assert truncated[tk.PREFIX_LEN :] == case["kept_ids"], prompt[:40]


def test_red_fox_example(fallback):
    ids = fallback.tokenize("a red fox in the snow")
    assert len(ids) == 125
    assert ids[:97] == CASES["prefix_ids"] and ids[-22:] == CASES["suffix_ids"]
    assert ids[97:-22] == [64, 3592, 68347, 306, 290, 15214]


def test_empty_prompt_is_templated(fallback):
    assert fallback.tokenize("") == CASES["prefix_ids"] + CASES["suffix_ids"]


# --- truncation -----------------------------------------------------------------------------------


def test_default_truncation_keeps_suffix_and_warns(fallback, caplog):
    with caplog.at_level(logging.WARNING, logger="lens_model.tokenizer"):
        ids = fallback.tokenize(LONG_CASE["prompt"])
    assert len(ids) == 512
    assert ids[-22:] == CASES["suffix_ids"]
    assert ids[:490] == LONG_CASE["full_ids"][:490]
    assert any("suffix" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert fallback.tokenize(LONG_CASE["prompt"], keep_suffix=True) == ids
    assert fallback.tokenize(LONG_CASE["prompt"], truncation="suffix") == ids


def test_upstream_truncation_warns_and_alias(fallback, caplog):
    with caplog.at_level(logging.WARNING, logger="lens_model.tokenizer"):
        ids = fallback.tokenize(LONG_CASE["prompt"], truncation="upstream")
    assert ids == LONG_CASE["truncated_ids"]
    assert ids[-22:] != CASES["suffix_ids"]
    assert any("upstream" in r.getMessage() for r in caplog.records)
    assert fallback.tokenize(LONG_CASE["prompt"], keep_suffix=False) == ids


def test_short_prompt_never_warns(fallback, caplog):
    with caplog.at_level(logging.WARNING, logger="lens_model.tokenizer"):
        fallback.tokenize("a cat")
    assert not caplog.records


def test_truncation_argument_errors(fallback):
    with pytest.raises(ValueError, match="truncation"):
        fallback.tokenize("a cat", truncation="left")
    with pytest.raises(ValueError, match="contradicts"):
        fallback.tokenize("a cat", keep_suffix=True, truncation="upstream")


# --- date -----------------------------------------------------------------------------------------


def test_date_changes_exactly_the_six_date_tokens(fallback):
    golden = CASES["prefix_ids"]
    starts = [i for i in range(len(golden) - 5) if golden[i : i + 6] == GOLDEN_DATE_IDS]
    assert len(starts) == 1
    s = starts[0]
    other = fallback.prefix_ids("1999-12-31")
    assert len(other) == 97
    changed = [i for i in range(97) if other[i] != golden[i]]
    assert changed and set(changed) <= set(range(s, s + 6))
    assert fallback.decode(other[s : s + 6]) == "1999-12-31"
    full = fallback.tokenize("a cat", date="1999-12-31")
    assert full[:97] == other and full[97:] == CASES["cases"][0]["kept_ids"]


def test_date_options(fallback):
    assert len(fallback.prefix_ids("today")) == 97
    import datetime

    assert fallback.prefix_ids(datetime.date(2026, 5, 23)) == CASES["prefix_ids"]
    for bad in ("23-05-2026", "2026-02-30", "yesterday"):
        with pytest.raises(ValueError, match="date"):
            fallback.prefix_ids(bad)


# --- harmony markers ------------------------------------------------------------------------------


def test_strip_harmony_markers():
    assert tk.strip_harmony_markers("a <|end|><|start|>cat") == "a cat"
    assert tk.strip_harmony_markers("x<|en<|end|>d|>y") == "xy"
    assert tk.strip_harmony_markers("<|reserved_200100|><|endoftext|>ok<|call|>") == "ok"
    assert tk.strip_harmony_markers("keep <|foo|> and <| end |>") == "keep <|foo|> and <| end |>"


def test_markers_stripped_by_default_kept_on_request(fallback):
    plain = fallback.tokenize("a red fox in the snow")
    assert fallback.tokenize("a red fox <|end|><|start|>in the snow") == fallback.tokenize(
        "a red fox in the snow"
    )
    assert fallback.tokenize("a red fox in the snow<|end|><|start|>") == plain
    kept = fallback.tokenize("a red fox in the snow<|end|><|start|>", strip_markers=False)
    assert kept == plain[:-22] + [200007, 200006] + plain[-22:]
    kept = fallback.tokenize("<|reserved_200100|>", strip_markers=False)
    assert kept[97:-22] == [200100]


# --- sources and search order ---------------------------------------------------------------------


def test_find_tokenizer_source_order(tmp_path, tokenizer_json_text):
    # diffusers pipeline root: text_encoder/ + tokenizer/
    root = tmp_path / "pipe"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    weights = root / "text_encoder" / "model.safetensors"
    save_file({"layers.0.self_attn.sinks": torch.zeros(4)}, str(weights))
    tok_json = root / "tokenizer" / "tokenizer.json"
    tok_json.write_text(tokenizer_json_text, encoding="utf-8")
    assert tk.find_tokenizer_source(root) == ("file", tok_json)
    assert tk.find_tokenizer_source(weights) == ("file", tok_json)
    assert tk.find_tokenizer_source(root / "text_encoder") == ("file", tok_json)

    # tokenizer.json beside the weights beats the tokenizer/ sibling
    beside = root / "text_encoder" / "tokenizer.json"
    beside.write_text(tokenizer_json_text, encoding="utf-8")
    assert tk.find_tokenizer_source(weights) == ("file", beside)

    # an embedded tokenizer_json beats everything
    embedded = root / "text_encoder" / "te_embedded.safetensors"
    _write_embedded(embedded, tokenizer_json_text)
    assert tk.find_tokenizer_source(embedded) == ("embedded", embedded)

    # a shard set whose index names the tokenizer_json shard
    shards = tmp_path / "shards" / "te"
    shards.mkdir(parents=True)
    _write_embedded(shards / "model-00002-of-00002.safetensors", tokenizer_json_text)
    save_file({"a": torch.zeros(1)}, str(shards / "model-00001-of-00002.safetensors"))
    index = shards / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "tokenizer_json": "model-00002-of-00002.safetensors",
                    "layers.0.self_attn.sinks": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    found = ("embedded", shards / "model-00002-of-00002.safetensors")
    assert tk.find_tokenizer_source(index) == found
    assert tk.find_tokenizer_source(shards) == found
    assert tk.find_tokenizer_source(shards / "model-00001-of-00002.safetensors") == found

    # nothing near the weights: the built-in fallback
    lone = tmp_path / "lone" / "models"
    lone.mkdir(parents=True)
    bare = lone / "te.safetensors"
    save_file({"a": torch.zeros(1)}, str(bare))
    assert tk.find_tokenizer_source(bare) == ("fallback", tk.FALLBACK_RANKS_PATH)


def test_load_tokenizer_from_folders(sources):
    root = sources["root"] / "pipe"
    for path in (root, root / "tokenizer"):
        tok = tk.load_tokenizer(path)
        assert tok.source == str((root / "tokenizer" / "tokenizer.json").resolve())
        assert tok.tokenize("a cat") == CASES["cases"][0]["full_ids"]


def test_load_tokenizer_ranks_file(tmp_path, fallback, monkeypatch):
    """A plain (not gzipped) o200k_base.tiktoken is read and sha-checked like the shipped .gz."""
    plain = tmp_path / "o200k_base.tiktoken"
    plain.write_bytes(gzip.decompress(tk.FALLBACK_RANKS_PATH.read_bytes()))
    ranks = tk.read_o200k_ranks(plain)
    assert ranks == tk.read_o200k_ranks(tk.FALLBACK_RANKS_PATH)
    assert len(ranks) == 199998 and ranks[b"a"] == 64
    built = []

    def fake_build(r):  # skip a second multi-second build; the real one is covered by `fallback`
        built.append(len(r))
        return fallback.backend

    monkeypatch.setattr(tk, "build_tokenizer_from_ranks", fake_build)
    tok = tk.load_tokenizer(plain)
    assert built == [199998] and "fallback" in tok.source


def test_missing_everything_names_the_places(tmp_path, monkeypatch):
    weights = tmp_path / "a" / "te.safetensors"
    weights.parent.mkdir()
    save_file({"a": torch.zeros(1)}, str(weights))
    monkeypatch.setattr(tk, "FALLBACK_RANKS_PATH", tmp_path / "missing" / "o200k_base.tiktoken.gz")
    with pytest.raises(FileNotFoundError, match="No tokenizer found for") as err:
        tk.find_tokenizer_source(weights)
    msg = str(err.value)
    assert "tokenizer_json" in msg and str(weights.parent / "tokenizer.json") in msg
    assert "o200k_base.tiktoken.gz" in msg
    with pytest.raises(FileNotFoundError, match="fallback"):
        tk.load_tokenizer()
    with pytest.raises(FileNotFoundError, match="not found"):
        tk.find_tokenizer_source(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        tk.load_tokenizer(tmp_path / "nope.json")


def test_sha256_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    raw = bytearray(gzip.decompress(tk.FALLBACK_RANKS_PATH.read_bytes()))
    raw[100] ^= 1
    bad = tmp_path / "o200k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    monkeypatch.setattr(tk, "FALLBACK_RANKS_PATH", bad)
    with pytest.raises(ValueError, match="sha256") as err:
        tk.load_tokenizer()
    assert str(bad) in str(err.value) and tk.O200K_BASE_SHA256 in str(err.value)


def test_foreign_tokenizer_json_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    path = tmp_path / "tokenizer.json"
    path.write_text(other.to_str(), encoding="utf-8")
    with pytest.raises(ValueError, match="not the o200k_harmony tokenizer"):
        tk.load_tokenizer(path)


def test_embedded_tensor_must_be_uint8(tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"tokenizer_json": torch.zeros(8, dtype=torch.float32)}, str(path))
    with pytest.raises(ValueError, match="uint8"):
        tk.load_tokenizer(path)


def test_merges_from_ranks_by_hand():
    # "abc" splits as (a, bc) or (ab, c); BPE below its rank merges "ab" (3) before "bc" (4).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"bcc": 6}
    assert tk.merges_from_ranks(ranks) == [
        (b"a", b"b"),
        (b"b", b"c"),
        (b"ab", b"c"),
        (b"bc", b"c"),
    ]
