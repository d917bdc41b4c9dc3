"""The o200k_harmony tokenizer and the Lens harmony prompt template.

A prompt P becomes ``PREFIX(date) + P + SUFFIX``; the prefix is 97 tokens for any date and the suffix
22 tokens. Special tokens bound every segment, so ids(prefix + P + suffix) = ids(prefix) ++ ids(P) ++
ids(suffix). The sequence is capped at 512 tokens; the encoder later drops the first 97 positions.

Tokenizer sources, in priority order: a ``tokenizer_json`` uint8 tensor inside a ComfyUI text-encoder
file, a ``tokenizer.json`` file, and the built-in fallback: OpenAI's o200k_base ranks shipped in
``lens_model/data`` (MIT), converted in memory into a Hugging Face ``tokenizers`` BPE plus the
harmony special tokens. All three produce identical ids.
"""

from __future__ import annotations

import binascii
import datetime
import gzip
import hashlib
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .checkpoints import CheckpointError, file_identity, read_safetensors_header, read_tensor_from_file
from .constants import DEFAULT_DATE, MAX_LENGTH, PAD_ID, PREFIX_LEN, SUFFIX_LEN, VOCAB_SIZE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------------------------------
# Constants (the template lengths, padding id and default date live in constants.py)

TRUNCATION_MODES = ("suffix", "upstream")
DEFAULT_TRUNCATION = "suffix"

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
DATA_DIR = Path(__file__).resolve().parent / "data"
FALLBACK_RANKS_PATH = DATA_DIR / "o200k_base.tiktoken.gz"

# Named o200k_harmony special tokens; every other id in 200000..201087 is <|reserved_{id}|>.
NAMED_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": PAD_ID,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
FIRST_SPECIAL_ID = 199998


def _harmony_special_tokens() -> dict[str, int]:
    by_id = {i: s for s, i in NAMED_SPECIAL_TOKENS.items()}
    return {by_id.get(i, f"<|reserved_{i}|>"): i for i in range(FIRST_SPECIAL_ID, VOCAB_SIZE)}


HARMONY_SPECIAL_TOKENS: dict[str, int] = _harmony_special_tokens()
"""All 1090 o200k_harmony special tokens (ids 199998..201087), string -> id."""

# o200k pre-tokenizer regex: the alternation of seven patterns (the split tiktoken's o200k_base uses).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Lens' harmony template (system, developer and user messages, then a fixed assistant analysis),
# split around {DATE} and {PROMPT}. There is no newline
# between <|end|> and the next <|start|>.
_PREFIX_HEAD = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: "
)
_PREFIX_TAIL = (
    "\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    "<|end|><|start|>developer<|message|># Instructions\n\n"
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background.\n\n"
    "<|end|><|start|>user<|message|>"
)
SUFFIX_TEXT = (
    "<|end|><|start|>assistant<|channel|>analysis<|message|>"
    "Need to generate one image according to the description."
    "<|end|><|start|>assistant<|channel|>final<|message|>"
)

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MARKER_RE = re.compile(
    r"<\|(?:start|end|message|channel|return|call|constrain|endoftext|startoftext|endofprompt"
    r"|reserved_\d+)\|>"
)


# --------------------------------------------------------------------------------------------------
# Template


def resolve_date(date: Union[str, datetime.date, None] = None) -> str:
    """Template date as ``YYYY-MM-DD``: None -> DEFAULT_DATE, "today" -> the local date."""
    if date is None:
        return DEFAULT_DATE
    if isinstance(date, datetime.date):
        return date.strftime("%Y-%m-%d")
    if not isinstance(date, str):
        raise TypeError(f"template date must be a 'YYYY-MM-DD' string, 'today' or None, got {date!r}")
    text = date.strip()
    if text.lower() == "today":
        return datetime.date.today().strftime("%Y-%m-%d")
    if not _DATE_RE.fullmatch(text):
        raise ValueError(f"template date must look like YYYY-MM-DD (or be 'today'), got {date!r}")
    try:
        datetime.date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"template date {date!r} is not a valid calendar date: {exc}") from None
    return text


def render_prefix(date: Union[str, datetime.date, None] = None) -> str:
    """Template text up to and including ``<|start|>user<|message|>``."""
    return _PREFIX_HEAD + resolve_date(date) + _PREFIX_TAIL


def render_template(prompt: str, date: Union[str, datetime.date, None] = None) -> str:
    """The exact harmony string Lens feeds to gpt-oss, byte for byte.

    ``date`` defaults to DEFAULT_DATE ("2026-05-23"); "today" uses the local clock (upstream does
    this, so its features drift from day to day). The prompt is inserted as is: strip control
    markers first (:func:`strip_harmony_markers`) if the text is untrusted.
    """
    return render_prefix(date) + prompt + SUFFIX_TEXT


def strip_harmony_markers(text: str) -> str:
    """Remove harmony control-token strings from user text, so a prompt cannot end its own message.

    Removes ``<|start|>``, ``<|end|>``, ``<|message|>``, ``<|channel|>``, ``<|return|>``, ``<|call|>``,
    ``<|constrain|>``, ``<|endoftext|>``, ``<|startoftext|>``, ``<|endofprompt|>`` and
    ``<|reserved_NNNNNN|>``, repeating until none is left (so ``<|en<|end|>d|>`` cannot leave a marker
    behind). Other text, including other ``<|...|>`` strings, is kept.
    """
    while True:
        stripped = _MARKER_RE.sub("", text)
        if stripped == text:
            return stripped
        text = stripped


# --------------------------------------------------------------------------------------------------
# The tokenizer


class LensTokenizer:
    """o200k_harmony tokenizer plus the Lens template.

    Wraps a ``tokenizers.Tokenizer`` (``.backend``) whose special-token ids have been checked against
    the harmony table. ``.source`` says where it came from. Instances are cheap; the backends behind
    :func:`load_tokenizer` are cached per process.
    """

    def __init__(self, backend, source: str = "<in memory>"):
        self.backend = backend
        self.source = source
        _check_special_tokens(backend, source)
        self._prefix_cache: dict[str, list[int]] = {}
        suffix = self.encode_text(SUFFIX_TEXT)
        if len(suffix) != SUFFIX_LEN:
            raise ValueError(
                f"tokenizer from {source} turns the Lens template suffix into {len(suffix)} tokens, "
                f"expected {SUFFIX_LEN}; it is not the o200k_harmony tokenizer of gpt-oss"
            )
        self._suffix_ids = suffix

    def __repr__(self) -> str:
        return f"LensTokenizer(source={self.source!r})"

    # ids ------------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Raw ids of ``text``: special-token strings become their ids, no template, no BOS/EOS."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def prefix_ids(self, date: Union[str, datetime.date, None] = None) -> list[int]:
        """The 97 template ids before the prompt, for ``date`` (default DEFAULT_DATE).

        Computed by tokenizing the prefix; raises if the count is not PREFIX_LEN.
        """
        key = resolve_date(date)
        ids = self._prefix_cache.get(key)
        if ids is None:
            ids = self.encode_text(render_prefix(key))
            if len(ids) != PREFIX_LEN:
                raise ValueError(
                    f"the Lens template prefix for date {key!r} is {len(ids)} tokens with the tokenizer "
                    f"from {self.source}, expected {PREFIX_LEN}; the encoder's {PREFIX_LEN}-token offset would "
                    f"be wrong. Use a YYYY-MM-DD date and the o200k_harmony tokenizer."
                )
            self._prefix_cache[key] = ids
        return list(ids)

    @property
    def suffix_ids(self) -> list[int]:
        """The 22 template ids after the prompt."""
        return list(self._suffix_ids)

    def tokenize(
        self,
        prompt: str,
        date: Union[str, datetime.date, None] = None,
        strip_markers: bool = True,
        keep_suffix: bool | None = None,
        truncation: str | None = None,
        max_length: int | None = MAX_LENGTH,
    ) -> list[int]:
        """Templated ids of ``prompt``, prefix included, at most ``max_length`` (512) of them.

        Args:
            prompt: user text; an empty prompt still gives the template (119 ids).
            date: template date, ``YYYY-MM-DD``, "today" or None (DEFAULT_DATE).
            strip_markers: remove harmony control markers from the prompt first (default). With
                False they are tokenized as control tokens, as upstream does.
            truncation: what happens when the templated sequence exceeds ``max_length``:
                ``"suffix"`` (default): keep the first ``max_length - 22`` ids and then the 22-token
                suffix, so the sequence still ends like the template;
                ``"upstream"``: plain right truncation of the whole sequence, as upstream Lens does
                (the golden long-prompt case checks this); the suffix is lost.
                Either way a warning is logged. Prompts under 394 tokens are never truncated.
            keep_suffix: shorthand for ``truncation``: True = "suffix", False = "upstream".
            max_length: the cap; None disables it.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        mode = _resolve_truncation(keep_suffix, truncation)
        if strip_markers:
            cleaned = strip_harmony_markers(prompt)
            if cleaned != prompt:
                logger.info("Removed harmony control markers from the prompt (strip_markers=True).")
            prompt = cleaned
        ids = self.prefix_ids(date) + self.encode_text(prompt) + self._suffix_ids
        if max_length is None or len(ids) <= max_length:
            return ids
        return self._truncate(ids, max_length, mode)

    def _truncate(self, ids: list[int], max_length: int, mode: str) -> list[int]:
        """Templated ``ids`` longer than ``max_length`` cut as ``mode`` says (see :meth:`tokenize`),
        with a warning that says what was lost."""
        n_prompt = len(ids) - PREFIX_LEN - SUFFIX_LEN
        if mode == "upstream":
            if max_length < 1:
                raise ValueError(f"max_length must be positive, got {max_length}")
            kept = max(0, min(n_prompt, max_length - PREFIX_LEN))
            logger.warning(
                "Prompt is %d tokens; the templated sequence (%d) exceeds %d, so it was cut from the "
                "right (truncation='upstream'): %d prompt tokens kept and the %d-token template "
                "suffix lost.",
                n_prompt, len(ids), max_length, kept, SUFFIX_LEN,
            )
            return ids[:max_length]
        if max_length < PREFIX_LEN + SUFFIX_LEN:
            raise ValueError(
                f"max_length {max_length} leaves no room for the {PREFIX_LEN}-token prefix and the "
                f"{SUFFIX_LEN}-token suffix with truncation='suffix'"
            )
        kept = max_length - PREFIX_LEN - SUFFIX_LEN
        logger.warning(
            "Prompt is %d tokens; the templated sequence (%d) exceeds %d, so only the first %d prompt "
            "tokens were kept, followed by the %d-token template suffix (truncation='suffix'; "
            "upstream Lens cuts the suffix instead: truncation='upstream').",
            n_prompt, len(ids), max_length, kept, SUFFIX_LEN,
        )
        return ids[: max_length - SUFFIX_LEN] + self._suffix_ids

    def to_json(self) -> str:
        """The backend as a ``tokenizer.json`` string (compact)."""
        return self.backend.to_str()


def _resolve_truncation(keep_suffix: bool | None, truncation: str | None) -> str:
    if truncation is not None and truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if keep_suffix is None:
        return truncation or DEFAULT_TRUNCATION
    implied = "suffix" if keep_suffix else "upstream"
    if truncation is not None and truncation != implied:
        raise ValueError(
            f"keep_suffix={keep_suffix} contradicts truncation={truncation!r}; give only one of them"
        )
    return implied


def _check_special_tokens(backend, source: str) -> None:
    for text, want in HARMONY_SPECIAL_TOKENS.items():
        got = backend.token_to_id(text)
        if got != want:
            raise ValueError(
                f"tokenizer from {source} is not the o200k_harmony tokenizer of gpt-oss: {text} has id "
                f"{got}, expected {want}. Use the tokenizer.json of openai/gpt-oss-20b, or remove the "
                f"file so the built-in o200k_base fallback is used."
            )


# --------------------------------------------------------------------------------------------------
# Fallback: o200k_base ranks -> tokenizers BPE


def read_o200k_ranks(path: PathLike) -> dict[bytes, int]:
    """Token bytes -> rank from an ``o200k_base.tiktoken`` file (plain or gzip), sha256-checked.

    Raises FileNotFoundError if the file is missing and ValueError if its unpacked sha256 is not
    O200K_BASE_SHA256.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"o200k_base ranks file not found: {path}")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"o200k_base ranks file {path} is not a valid gzip file: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise ValueError(
            f"o200k_base ranks file {path} has (unpacked) sha256 {digest}, expected {O200K_BASE_SHA256}; "
            f"it is damaged or not o200k_base. Reinstall the node pack, or replace the file with "
            f"bpe_openai/data/o200k_base.tiktoken.gz from the MIT `bpe-openai` wheel."
        )
    a2b = binascii.a2b_base64
    ranks = {a2b(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to the ranks, in rank order of the merged token.

    For each token of two or more bytes, run tiktoken's BPE on its own bytes using only ranks below
    the token's rank; it ends in exactly two parts, which form the token's merge. When only one
    split of the token has both halves ranked below it, that split is taken without the BPE run.
    """
    get = ranks.get
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(token)
        if n < 2:
            continue
        # Fast path: a unique split into two lower-ranked tokens.
        split = 0
        for i in range(1, n):
            if get(token[:i], rank) < rank and get(token[i:], rank) < rank:
                if split:
                    split = -1
                    break
                split = i
        if split > 0:
            merges.append((token[:split], token[split:]))
            continue
        if split == 0:
            raise ValueError(f"o200k_base rank {rank} cannot be split into two lower-ranked tokens")
        # BPE on the token's bytes, merges restricted to ranks below `rank`.
        parts = [token[i : i + 1] for i in range(n)]
        pair_ranks = [get(token[i : i + 2], rank) for i in range(n - 1)]
        while len(parts) > 2:
            best = min(pair_ranks)
            if best >= rank:
                break
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = get(parts[i - 1] + parts[i], rank)
            if i < len(pair_ranks):
                pair_ranks[i] = get(parts[i] + parts[i + 1], rank)
        if len(parts) != 2:
            raise ValueError(f"o200k_base rank {rank}: BPE below its rank ends in {len(parts)} parts, not 2")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level_table() -> dict[int, str]:
    """GPT-2 byte -> printable unicode map, as a str.translate table over latin-1 text."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer_from_ranks(ranks: dict[bytes, int]):
    """An in-memory ``tokenizers.Tokenizer`` giving the same ids as o200k_harmony (the fallback source).

    Byte-level BPE vocab and merges derived from the ranks (``ignore_merges=True``), Split(o200k
    regex, isolated) + ByteLevel(use_regex=False) pre-tokenizer, ByteLevel decoder, and the 1090
    harmony special tokens at ids 199998..201087.
    """
    table = _byte_level_table()

    def to_str(b: bytes) -> str:
        return b.decode("latin-1").translate(table)

    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != FIRST_SPECIAL_ID:
        raise ValueError(f"o200k_base ranks must be 0..{FIRST_SPECIAL_ID - 1} without gaps")
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in merges_from_ranks(ranks)]
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    except TypeError as exc:  # tokenizers < 0.19 has no ignore_merges
        raise ImportError(
            "The Lens tokenizer fallback needs tokenizers >= 0.19 (BPE ignore_merges); "
            "pip install -U tokenizers"
        ) from exc
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = sorted(HARMONY_SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, _ in specials])
    return tokenizer


@lru_cache(maxsize=2)
def _fallback_backend(path: str, size: int, mtime_ns: int):
    return build_tokenizer_from_ranks(read_o200k_ranks(path))


def _backend_from_json(text: str, where: str):
    """A ``tokenizers.Tokenizer`` from tokenizer.json text, with any stored truncation/padding off."""
    try:
        backend = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{where} is not a valid tokenizers JSON: {exc}") from exc
    backend.no_truncation()
    backend.no_padding()
    return backend


@lru_cache(maxsize=4)
def _json_backend(path: str, size: int, mtime_ns: int):
    return _backend_from_json(Path(path).read_text(encoding="utf-8"), path)


@lru_cache(maxsize=4)
def _embedded_backend(path: str, key: str, size: int, mtime_ns: int):
    return _backend_from_json(read_embedded_tokenizer_json(path, key), f"the `{key}` tensor in {path}")


# --------------------------------------------------------------------------------------------------
# Embedded tokenizer_json (ComfyUI text-encoder files)


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors header (data untouched); [] for an unreadable header."""
    try:
        return list(read_safetensors_header(path)[0])
    except (CheckpointError, OSError):
        return []


def _tokenizer_key(keys) -> str | None:
    for key in keys:
        if key == "tokenizer_json" or key.endswith(".tokenizer_json"):
            return key
    return None


def read_embedded_tokenizer_json(path: PathLike, key: str = "tokenizer_json") -> str:
    """The JSON text stored as a 1-D uint8 tensor ``key`` in a safetensors file (only that tensor is read)."""
    path = Path(path)
    tensor = read_tensor_from_file(path, key)
    if tensor.ndim != 1 or str(tensor.dtype) != "torch.uint8":
        raise ValueError(
            f"`{key}` in {path} is {tensor.dtype} {list(tensor.shape)}, expected a 1-D uint8 tensor "
            f"holding the UTF-8 bytes of a tokenizer.json"
        )
    try:
        return tensor.numpy().tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"`{key}` in {path} is not UTF-8 text: {exc}") from None


def _embedded_source(path: Path) -> tuple[Path, str] | None:
    """(safetensors file, key) holding an embedded tokenizer_json for weights at ``path``, if any."""
    if path.is_file() and path.name.endswith(".index.json"):
        return _embedded_from_index(path)
    if path.is_file() and path.suffix == ".safetensors":
        key = _tokenizer_key(_safetensors_keys(path))
        if key:
            return path, key
        for index in sorted(path.parent.glob("*.safetensors.index.json")):
            found = _embedded_from_index(index, member=path.name)
            if found:
                return found
        return None
    if path.is_dir():
        for index in sorted(path.glob("*.safetensors.index.json")):
            found = _embedded_from_index(index)
            if found:
                return found
        for file in sorted(path.glob("*.safetensors")):
            key = _tokenizer_key(_safetensors_keys(file))
            if key:
                return file, key
    return None


def _embedded_from_index(index: Path, member: str | None = None) -> tuple[Path, str] | None:
    """The shard of ``index`` holding tokenizer_json (if ``member`` is given, only when that file is
    one of the index's shards)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(weight_map, dict):
        return None
    key = _tokenizer_key(weight_map)
    if not key or (member is not None and member not in weight_map.values()):
        return None
    shard = index.parent / weight_map[key]
    return (shard, key) if shard.is_file() else None


# --------------------------------------------------------------------------------------------------
# Search order and loading


def find_tokenizer_source(weights_path: PathLike) -> tuple[str, Path]:
    """Where the tokenizer for text-encoder weights at ``weights_path`` comes from, first match wins.

    Returns ``(kind, location)``:
      ``("embedded", file)``: a ``tokenizer_json`` uint8 tensor inside the safetensors ``file``
        (the file itself, a shard named by a ``*.safetensors.index.json``, or a file in the folder);
      ``("file", tokenizer.json)``: ``tokenizer.json`` in the weights' folder or its parent, else
        ``tokenizer/tokenizer.json`` in either (the diffusers ``tokenizer/`` sibling);
      ``("fallback", o200k_base.tiktoken.gz)``: the built-in ranks.
    ``weights_path`` may be a safetensors file, an index json, or a folder. Raises FileNotFoundError
    naming every place searched when even the fallback file is missing.
    """
    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"text-encoder weights not found: {path}")
    embedded = _embedded_source(path)
    if embedded:
        return "embedded", embedded[0]
    folder = path if path.is_dir() else path.parent
    dirs = [folder] if folder.parent == folder else [folder, folder.parent]
    candidates = [d / "tokenizer.json" for d in dirs] + [d / "tokenizer" / "tokenizer.json" for d in dirs]
    for candidate in candidates:
        if candidate.is_file():
            return "file", candidate
    fallback = Path(FALLBACK_RANKS_PATH)
    if fallback.is_file():
        return "fallback", fallback
    raise FileNotFoundError(
        f"No tokenizer found for {path}: looked for an embedded `tokenizer_json`, "
        f"{', '.join(str(c) for c in candidates)}, and the o200k_base fallback at {fallback}. "
        f"Put the tokenizer.json of openai/gpt-oss-20b next to the weights, or reinstall the node pack."
    )


def load_tokenizer(path: PathLike | None = None) -> LensTokenizer:
    """Load the o200k_harmony tokenizer.

    ``path`` may be:
      None: the built-in o200k_base fallback;
      a text-encoder safetensors file / index json / folder: searched as in
        :func:`find_tokenizer_source` (embedded ``tokenizer_json``, ``tokenizer.json`` nearby,
        diffusers ``tokenizer/`` sibling, fallback);
      a ``tokenizer.json`` file (any ``.json`` that is not a safetensors index);
      an ``o200k_base.tiktoken`` ranks file (plain or ``.gz``; sha256-checked).
    Backends are cached per process by file identity (path, size, mtime); the fallback build takes
    a few seconds the first time.
    """
    if path is None:
        kind, location = "fallback", Path(FALLBACK_RANKS_PATH)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path not found: {p}")
        if p.is_file() and p.suffix == ".json" and not p.name.endswith(".index.json"):
            kind, location = "file", p
        elif p.is_file() and (p.name.endswith(".tiktoken") or p.name.endswith(".tiktoken.gz")):
            kind, location = "fallback", p
        else:
            kind, location = find_tokenizer_source(p)
    location = location.resolve() if location.exists() else location
    if kind == "fallback":
        if not location.is_file():
            raise FileNotFoundError(
                f"No tokenizer found: the built-in o200k_base fallback {location} is missing. "
                f"Reinstall the node pack or pass a tokenizer.json."
            )
        backend = _fallback_backend(*file_identity([location]))
        source = f"o200k_base fallback ({location})"
    elif kind == "file":
        backend = _json_backend(*file_identity([location]))
        source = str(location)
    else:
        found = _embedded_source(location)
        if found is None:  # pragma: no cover - find_tokenizer_source just found it
            raise ValueError(f"{location} holds no `tokenizer_json` tensor")
        file, key = found
        ident = file_identity([file])
        backend = _embedded_backend(ident[0], key, ident[1], ident[2])
        source = f"`{key}` in {file}"
    logger.info("Lens tokenizer: %s", source)
    return LensTokenizer(backend, source)


__all__ = [
    "DEFAULT_DATE",
    "DEFAULT_TRUNCATION",
    "FALLBACK_RANKS_PATH",
    "HARMONY_SPECIAL_TOKENS",
    "LensTokenizer",
    "MAX_LENGTH",
    "NAMED_SPECIAL_TOKENS",
    "O200K_BASE_SHA256",
    "O200K_PATTERN",
    "PAD_ID",
    "PREFIX_LEN",
    "SUFFIX_LEN",
    "SUFFIX_TEXT",
    "TRUNCATION_MODES",
    "build_tokenizer_from_ranks",
    "find_tokenizer_source",
    "load_tokenizer",
    "merges_from_ranks",
    "read_embedded_tokenizer_json",
    "read_o200k_ranks",
    "render_prefix",
    "render_template",
    "resolve_date",
    "strip_harmony_markers",
]
