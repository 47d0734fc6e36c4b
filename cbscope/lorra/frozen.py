"""The frozen model's representations, computed once per example and reused at every step.

The frozen model (adapters off) never changes during a run, and with causal attention and right
padding an example's representations do not depend on the batch it sits in. So the frozen
representations of every circuit-breaker example (at the target layers) and every retain
example (at the retain layers) are computed once, kept in a :class:`FrozenCache`, and read back
at every later step: the step then runs only the adapted forward and its backward
(``LorraConfig.cache_frozen``; the loop in :mod:`cbscope.lorra.loop`).

**The canonical forward.** An entry is computed with its example at its own length (no
padding), in a batch of examples of that same length, and never in a matrix product of fewer than
:data:`MIN_TOKENS` token rows (a short group repeats its rows). On the CPU the value then does
not depend on which examples were computed with it, or when (BLAS picks another kernel for a
product of a few rows; rows of one length are computed independently otherwise). So a resumed run
that rebuilds the cache, a later run that reads it from disk, and the runs of ``cbscope
generalise`` that share one cache all read the same numbers. They are not bit-identical to the
batched frozen forward of an uncached run, whose float sums depend on the padded width of the
batch. On the CPU (torch 2.13, one thread) the two agree bit for bit when the padded width and the
example's length are on the same side of 32 tokens. Over the organism preset's plan, 4381 of 8000
rows agreed; the rest differed by at most 1.9e-6 absolute, 1.0e-6 of the token's norm
(``benchmarks/bench_train.py --organism``; docs/training.md).

**Keys.** A cache is bound to a model: the sha256 of the base weights' safetensors files (each
hashed once, then remembered by size and modification time in ``cache_dir()/frozen/``), the
architecture config, the dtype, the device type, the torch version and thread count and
cbscope's version. An entry's key is the sha256 of the example's token ids and the layers it
holds. A changed base model finds no entries (a memory cache bound to another model is emptied),
and a changed example has another key.

**Stores.** ``memory``: the tensors on the training device, for this process (and whatever
shares the :class:`FrozenCache` object, e.g. the runs of ``cbscope generalise``). ``disk``: one
safetensors file per entry under ``cache_dir()/frozen/<model key>/``, read through a memory map;
it outlives the process, so a resumed run, or a later run on the same model, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.lorra.config import CACHE_STORES, ConfigError

logger = logging.getLogger(__name__)

#: Token rows below which a matrix product may take another BLAS kernel (seen below 16 rows).
MIN_TOKENS = 32
STORES = CACHE_STORES
FROZEN_DIR = "frozen"
DIGESTS_FILE = "digests.json"
#: Bumped when the canonical forward changes (part of every model key).
FORMAT = 1
CB, RETAIN = "cb", "retain"


def frozen_root() -> Path:
    """``cache_dir()/frozen``."""
    from cbscope.models import cache_dir

    return cache_dir() / FROZEN_DIR


def file_digest(path: Path) -> str:
    """The sha256 of a file, remembered by its resolved path, size and modification time.

    A changed file changes its size or modification time, so the remembered digest is only
    reused for the same bytes (large models are hashed once, not at every run).
    """
    from cbscope.io import atomic_write_text
    from cbscope.lorra.checkpoint import sha256_file

    path = Path(path).resolve()
    stat = path.stat()
    memo = frozen_root() / DIGESTS_FILE
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    stamp = [stat.st_size, stat.st_mtime_ns]
    found = known.get(str(path))
    if isinstance(found, dict) and found.get("stamp") == stamp:
        return str(found["sha256"])
    digest = sha256_file(path)
    known[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        atomic_write_text(memo, json.dumps(known, indent=1))
    except OSError as err:  # a read-only cache folder only costs the hashing next time
        logger.debug("cannot remember the digest of %s: %s", path, err)
    return digest


def weights_key(pair: Any) -> str:
    """A digest of the base weights: of the model folder's safetensors files, else (weights not
    in files) of the base parameters in memory."""
    folder = getattr(getattr(pair, "resolved", None), "path", None)
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None else []
    digest = hashlib.sha256()
    if files:
        for path in files:
            digest.update(f"{path.name}:{file_digest(path)};".encode())
        return digest.hexdigest()
    for name, param in pair.model.named_parameters():
        if "lora_" not in name:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_dtype(pair: Any) -> torch.dtype:
    """The dtype of the base model's weights (the dtype of its representations)."""
    for name, param in pair.model.named_parameters():
        if "lora_" not in name and param.is_floating_point():
            return param.dtype
    return torch.float32


def model_key(pair: Any) -> str:
    """What a cached representation depends on besides the example: base weights, architecture,
    dtype, device type, torch version and threads, cbscope's version and :data:`FORMAT`."""
    import cbscope

    config = pair.model.config.to_dict() if hasattr(pair.model.config, "to_dict") else {}
    facts = {
        "weights": weights_key(pair),
        "config": {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")},
        "dtype": str(model_dtype(pair)),
        "device": torch.device(pair.device).type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cbscope": cbscope.__version__,
        "format": FORMAT,
    }
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def entry_key(ids: Sequence[int], layers: Sequence[int]) -> str:
    """The key of one example's representations at ``layers``."""
    text = json.dumps([list(layers), list(ids)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------- stores
class _MemoryStore:
    """Entries as tensors in a dict (on the training device)."""

    def __init__(self) -> None:
        self.entries: dict[str, Tensor] = {}

    def get(self, key: str, device: torch.device) -> Tensor | None:
        value = self.entries.get(key)
        return None if value is None else value.to(device)

    def put(self, key: str, value: Tensor) -> None:
        self.entries[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()


class _DiskStore:
    """One safetensors file per entry in ``folder`` (read through a memory map)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sizes: dict[str, int] = {}  # the entries this process wrote or read

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device: torch.device) -> Tensor | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                value = handle.get_tensor("reps")
        except Exception as err:  # a truncated or damaged file: compute the entry again
            logger.warning("frozen cache entry %s is unreadable (%s): computing it again", path, err)
            path.unlink(missing_ok=True)
            return None
        self.sizes[key] = value.numel() * value.element_size()
        return value.to(device)

    def put(self, key: str, value: Tensor) -> None:
        from safetensors.torch import save_file

        from cbscope.io import atomic_write

        tensor = value.detach().to("cpu").contiguous()
        atomic_write(self.path(key), lambda p: save_file({"reps": tensor}, str(p)), fsync=False)
        self.sizes[key] = tensor.numel() * tensor.element_size()

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def __len__(self) -> int:
        return len(self.sizes)

    def clear(self) -> None:
        self.sizes.clear()


class FrozenCache:
    """Frozen representations by example, for one model at a time.

    Args:
        store: ``"memory"`` (tensors on the training device) or ``"disk"`` (safetensors files
            under ``folder``, default ``cache_dir()/frozen/<model key>/``).
        folder: The disk store's root (a folder per model key is made inside it).

    One object can serve several runs (``cbscope generalise`` passes one to each of its runs):
    entries of examples they share are computed once. Bound to another model
    (:meth:`bind`), a memory cache is emptied first, so it never mixes models.
    """

    def __init__(self, store: str = "memory", *, folder: str | os.PathLike[str] | None = None) -> None:
        if store not in STORES:
            raise ConfigError(f"store must be one of {STORES}, not {store!r}")
        self.store_kind = store
        self.root = Path(folder) if folder is not None else None
        self.key: str | None = None
        self._store: _MemoryStore | _DiskStore = _MemoryStore()

    def bind(self, pair: Any) -> str:
        """Bind the cache to ``pair``'s frozen model; returns the model key. Another model than
        the one bound before empties a memory cache (a disk cache moves to that model's
        folder)."""
        key = model_key(pair)
        if key != self.key:
            if self.key is not None:
                logger.info("frozen cache: another model (%s, was %s): entries dropped", key, self.key)
            self._store.clear()
            if self.store_kind == "disk":
                self._store = _DiskStore((self.root or frozen_root()) / key)
            else:
                self._store = _MemoryStore()
            self.key = key
        return key

    @property
    def folder(self) -> Path | None:
        """The disk store's folder (``None`` for a memory cache)."""
        return self._store.folder if isinstance(self._store, _DiskStore) else None

    def get(self, key: str, device: torch.device) -> Tensor | None:
        """The entry ``key`` on ``device``, or ``None``."""
        return self._store.get(key, device)

    def put(self, key: str, value: Tensor) -> None:
        """Keep ``value`` as the entry ``key``."""
        self._store.put(key, value)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        """Entries held (memory) or written and read by this process (disk)."""
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes of the entries held (memory) or written and read by this process (disk)."""
        return self._store.nbytes


# ---------------------------------------------------------------------- one run's view
@dataclass
class FrozenBatch:
    """A step's frozen representations, padded to the batch width (padding is 1.0: finite and of
    non-zero norm, so masked positions give zero gradients as in the uncached step).

    Attributes:
        cb: ``target_layer cb_row pos d_model``.
        retain: ``retain_layer retain_row pos d_model``.
    """

    cb: Tensor
    retain: Tensor


class FrozenReps:
    """One run's use of a :class:`FrozenCache`: the canonical fill and each step's tensors.

    Args:
        cache: The cache (bound to ``pair`` here).
        pair: The model pair (its frozen model computes missing entries).
        targets: Layers of circuit-breaker rows.
        retain_layers: Layers of retain rows.
        chunk_tokens: Token budget of one forward of the fill.
    """

    def __init__(self, cache: FrozenCache, pair: Any, targets: Sequence[int],
                 retain_layers: Sequence[int], *, chunk_tokens: int = 4096) -> None:
        self.cache = cache
        self.pair = pair
        self.layers = {CB: list(targets), RETAIN: list(retain_layers)}
        self.all_layers = sorted(set(targets) | set(retain_layers))
        self.chunk_tokens = max(int(chunk_tokens), MIN_TOKENS)
        self.model_key = cache.bind(pair)
        self.dtype = model_dtype(pair)
        self.computed = 0
        self._keys: dict[tuple[int, str], str] = {}

    def key(self, example: Any, role: str) -> str:
        """The entry key of ``example`` (an :class:`~cbscope.lorra.data.EncodedExample`) as a
        circuit-breaker (``"cb"``) or retain (``"retain"``) row."""
        memo = (id(example), role)
        if memo not in self._keys:
            self._keys[memo] = entry_key(example.ids, self.layers[role])
        return self._keys[memo]

    def unique(self, rows: Iterable[tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
        """``{key: (example, role)}`` of ``rows``, first occurrence kept."""
        out: dict[str, tuple[Any, str]] = {}
        for example, role in rows:
            out.setdefault(self.key(example, role), (example, role))
        return out

    def nbytes(self, items: Iterable[tuple[Any, str]]) -> int:
        """Bytes the entries of ``items`` take (each once)."""
        size = self.pair.d_model * torch.empty((), dtype=self.dtype).element_size()
        return sum(len(ex.ids) * len(self.layers[role]) * size for ex, role in items)

    def fill(self, rows: Iterable[tuple[Any, str]], *, show_progress: bool = False,
             force: bool = False) -> int:
        """Compute the entries of ``rows`` the cache lacks (all of them with ``force``; the
        canonical forward); returns how many."""
        missing = [(k, ex, role) for k, (ex, role) in self.unique(rows).items()
                   if force or k not in self.cache]
        if not missing:
            return 0
        by_length: dict[int, list[tuple[str, Any, str]]] = {}
        for item in missing:
            by_length.setdefault(len(item[1].ids), []).append(item)
        chunks = []
        for length in sorted(by_length):
            group = by_length[length]
            per_chunk = max(1, self.chunk_tokens // max(length, 1))
            chunks += [group[i : i + per_chunk] for i in range(0, len(group), per_chunk)]
        device = self.pair.device
        self.pair.set_training(False)
        bar = tqdm(chunks, desc="frozen cache", unit="batch", disable=not show_progress)
        with self.pair.original(), torch.no_grad():
            for chunk in bar:
                length = len(chunk[0][1].ids)
                ids = [ex.ids for _, ex, _ in chunk]
                repeat = -(-MIN_TOKENS // length)  # rows a product needs (a short chunk repeats)
                while len(ids) < repeat:
                    ids += ids[: repeat - len(ids)]
                tokens = torch.tensor(ids, dtype=torch.long, device=device)
                reps = self.pair.resid_layers(tokens, torch.ones_like(tokens), self.all_layers)
                for row, (key, _, role) in enumerate(chunk):
                    wanted = [self.all_layers.index(layer) for layer in self.layers[role]]
                    self.cache.put(key, torch.stack([reps[i][row] for i in wanted]))
        bar.close()
        self.computed += len(missing)
        return len(missing)

    def batch(self, cb_rows: Sequence[Any], retain_rows: Sequence[Any], width: int) -> FrozenBatch:
        """The frozen representations of a step's rows, padded to ``width`` (missing entries are
        computed first)."""
        rows = [(ex, CB) for ex in cb_rows] + [(ex, RETAIN) for ex in retain_rows]
        self.fill(rows)
        device = self.pair.device
        out = []
        for role, examples in ((CB, cb_rows), (RETAIN, retain_rows)):
            block = torch.ones((len(self.layers[role]), len(examples), width, self.pair.d_model),
                               dtype=self.dtype, device=device)
            for row, example in enumerate(examples):
                value = self.cache.get(self.key(example, role), device)
                shape = (len(self.layers[role]), len(example.ids), self.pair.d_model)
                if value is None or tuple(value.shape) != shape or value.dtype != self.dtype:
                    # a disk entry removed or damaged meanwhile: compute it again
                    self.fill([(example, role)], force=True)
                    value = self.cache.get(self.key(example, role), device)
                block[:, row, : value.shape[1]] = value
            out.append(block)
        return FrozenBatch(*out)
