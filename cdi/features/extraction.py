"""Feature extraction as a Lightning module: one encode per image, every planned family per batch.

How work is laid out, so that results never depend on how they were computed:
- images are deduplicated by row key (the sha256, plus the label or caption on a conditioned model:
  `cdi.features.cache.row_key`), the ones missing from the cache are sorted by sha256 and cut into
  batches of `batch_size`; batch i goes to rank i mod world size. A batch has the same composition
  whatever the number of processes, so 2 processes give the same bits as 1;
- each rank writes every finished batch to the feature cache as its own shard (atomic rename);
  the caller merges shards by row key. A killed extraction resumes at the first unfinished batch;
- noise is seeded per image sha256 (see `cdi.features.seeded_noise`), never by the row key;
- several processes meet within `CDI_RENDEZVOUS_TIMEOUT` seconds (default 300) or stop with an error
  that says how many ranks arrived.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch

from cdi.data.images import ImageDataset, ImageRecord
from cdi.errors import FeatureError, Interrupted, OptionError
from cdi.features.base import FeatureBatch
from cdi.features.batching import MODES as TIMESTEP_BATCHING_MODES
from cdi.features.batching import UNBATCHED, ModelCalls
from cdi.features.cache import FeatureCache, default_cache_dir, effective_caption, effective_label, row_key
from cdi.features.registry import FeatureConfig, plan_families
from cdi.models.base import DiffusionAdapter

log = logging.getLogger(__name__)
# RankBatchSampler returns every index by construction; Lightning cannot know that and warns.
warnings.filterwarnings("ignore", message=".*custom batch sampler.*", category=UserWarning)

PRECISIONS = ("auto", "32", "bf16", "16")
#: Seconds every rank of a multi-process extraction has to join (env CDI_RENDEZVOUS_TIMEOUT overrides).
RENDEZVOUS_TIMEOUT_S = 300.0
#: Lightning's DDP strategy names and the start method each stands for.
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


class RankBatchSampler(torch.utils.data.Sampler):
    """Fixed batches of consecutive indices; batch i belongs to rank i mod world size."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]

    def _mine(self) -> list[list[int]]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            return self.batches[rank::world]
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


class FeatureExtractor(L.LightningModule):
    """`predict_step` computes the requested features of a batch on every model it holds (a target and its
    references) and stores each model's rows in that model's cache.

    The models of one pass share what is the same for all of them: the decoded batch, its encoding where their
    encoders are the same (`DiffusionAdapter.encoder_identity`), every seeded noise draw (`FeatureBatch.noise`),
    the batch plan and the cache write; each model's features are the bits a pass of its own gives."""

    def __init__(
        self,
        adapter: DiffusionAdapter | Sequence[DiffusionAdapter],
        names: Sequence[str],
        config: FeatureConfig,
        seed: int,
        cache_root: str | Sequence[str] | None = None,
        precision: str = "32",
        channels_last: bool = False,
        session: str = "",
        threads: int | None = None,
        calls: ModelCalls = UNBATCHED,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        adapters = [adapter] if isinstance(adapter, DiffusionAdapter) else list(adapter)
        self.models = torch.nn.ModuleList(adapters)
        roots = list(cache_root) if isinstance(cache_root, (list, tuple)) else [cache_root] * len(adapters)
        if len(roots) != len(adapters):
            raise ValueError(f"{len(adapters)} models but {len(roots)} cache roots")
        self.cache_roots = roots
        self.names = tuple(names)
        self.config = config
        self.seed = int(seed)
        self.precision = precision
        self.channels_last = channels_last
        self.session = session
        self.threads = threads
        self.calls = calls
        self.compiled = compiled
        self._compiling: contextlib.ExitStack | None = None
        self.families = plan_families(self.names, config)

    @property
    def adapter(self) -> DiffusionAdapter:
        """The first model (the target)."""
        return self.models[0]

    def on_predict_start(self) -> None:
        self._threads_before = torch.get_num_threads()
        if self.threads:  # Lightning's CPU DDP picks its own count; kernels (and bits) depend on it
            torch.set_num_threads(self.threads)
        for adapter in self.models:
            if self.channels_last:
                adapter.to(memory_format=torch.channels_last)
        if self.compiled:  # in the rank's own process (ddp_spawn pickles the module: compile after the spawn)
            self._compiling = contextlib.ExitStack()
            for adapter in self.models:
                self._compiling.enter_context(compiled_denoiser(adapter, True))

    def teardown(self, stage: str) -> None:
        if self._compiling is not None:  # also after a failed batch: the eager forward is back
            self._compiling.close()
            self._compiling = None

    def on_predict_end(self) -> None:
        torch.set_num_threads(self._threads_before)
        if self.channels_last:  # hand the models back in the layout they came in
            for adapter in self.models:
                adapter.to(memory_format=torch.contiguous_format)
        if self.trainer.world_size > 1:  # rank 0 reads every rank's shards next: wait until all are written
            _wait_for_every_rank(self.trainer, "cdi-shards-written")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "16") and self.device.type in ("cuda", "cpu"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The first model's features (B, len(names)) in float32 and the seconds spent per family."""
        return self.compute_all(batch)[0]

    def compute_all(self, batch: dict) -> list[tuple[torch.Tensor, dict[str, float]]]:
        """Per model, in order: its features (B, len(names)) in float32 and the seconds spent per family."""
        labels, captions = _conditioning(batch)
        images = batch["image"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        noise: dict = {}  # every model and family of this batch draws each seeded noise tensor once
        encoded: dict = {}  # encoder identity -> z0
        out = []
        with self._autocast():
            for adapter in self.models:
                seconds: dict[str, float] = {}
                started = time.perf_counter()
                identity = adapter.encoder_identity()
                if identity is not None and identity in encoded:
                    z0 = encoded[identity].clone()
                else:
                    with torch.no_grad():
                        z0 = adapter.encode(images).float()
                    if identity is not None:
                        encoded[identity] = z0.detach().clone()
                seconds["encode"] = time.perf_counter() - started
                features = FeatureBatch(
                    z0=z0.detach(), cond=adapter.condition(labels, captions), sha256=list(batch["sha256"]),
                    seed=self.seed, calls=self.calls, noise_drawn=noise,
                )
                values: dict[str, torch.Tensor] = {}
                for family in self.families:
                    started = time.perf_counter()
                    # Gradient-free families run under inference mode; GM and NO need autograd.
                    mode = torch.inference_mode() if family.access == "gray" else contextlib.nullcontext()
                    with mode:
                        values.update(family.compute(adapter, features).values)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds[type(family).__name__] = time.perf_counter() - started
                out.append((torch.stack([values[name].float() for name in self.names], dim=1).detach(), seconds))
        return out

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        computed = self.compute_all(batch)  # every model's rows, then the writes: a failed batch writes none
        labels, captions = _conditioning(batch)
        for adapter, root, (matrix, seconds) in zip(self.models, self.cache_roots, computed):
            if root is None:
                continue
            conditioning = adapter.info.conditioning
            keys = [row_key(digest, conditioning, label, caption)
                    for digest, label, caption in zip(batch["sha256"], labels, captions)]
            FeatureCache(Path(root)).write(batch["sha256"], self.names, matrix.cpu().numpy(), seconds,
                                           f"{self.session}r{self.global_rank}-", keys)
        return {"n": len(batch["sha256"])}


def _conditioning(batch: dict) -> tuple[list, list]:
    """Labels and captions of a collated batch as the adapter gets them (the dataset writes None as -1 / "")."""
    return ([effective_label(label) for label in batch["label"]],
            [effective_caption(caption) for caption in batch["caption"]])


_barriers = 0  # barriers this process has passed: the same sequence in every rank, so a fresh name each time


def _wait_for_every_rank(trainer: L.Trainer, name: str) -> None:
    """A barrier that waits as long as the slowest rank needs (the process group's timeout is only the
    rendezvous timeout) and stays interruptible: each rank counts itself in on the process group's store
    and polls it from Python. Falls back to the strategy's barrier where the store is not reachable."""
    global _barriers
    _barriers += 1
    from torch.distributed import distributed_c10d

    try:
        store = distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        trainer.strategy.barrier(name)
        return
    key = f"{name}-{_barriers}"
    store.add(key, 1)
    while store.add(key, 0) < trainer.world_size:
        time.sleep(0.2)


class ImagesPerSecondBar(L.Callback):
    """A tqdm bar counted in images, with images/s and ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="img", desc="features", dynamic_ncols=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.bar is not None:
            self.bar.update(outputs["n"] * trainer.world_size)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class ExtractionReport:
    """Features of the requested images plus what it took to get them."""

    values: np.ndarray
    cache_hits: int
    cache_misses: int
    seconds: float
    family_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.cache_misses / self.seconds if self.seconds > 0 else math.inf


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise OptionError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_timestep_batching(mode: str, precision: str, device: str) -> bool:
    """Whether families batch their timesteps (`cdi.features.batching`). `auto`: on where it is measured to
    be faster and its features are cached apart anyway, i.e. in bf16 on CPU; off in float32, whose features
    stay the reference bits (batched float32 differs from them by up to ~2e-6 relative, measured:
    benchmarks/README.md), and off on CUDA until measured there."""
    if mode not in TIMESTEP_BATCHING_MODES:
        raise OptionError(f"--timestep-batching {mode!r}: choose one of {', '.join(TIMESTEP_BATCHING_MODES)}")
    if mode == "auto":
        return precision == "bf16" and device == "cpu"
    return mode == "on"


COMPILE_MODES = ("auto", "on", "off")
_compiler_works: dict[str, bool] = {}


def compiler_available(device: str = "cpu") -> bool:
    """Whether torch.compile's default backend compiles and runs a tiny function on `device` (checked once per
    process and device: on CPU inductor needs a working C++ compiler)."""
    if device not in _compiler_works:
        try:
            probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0 + 1.0)
            x = torch.linspace(-1.0, 1.0, 8, device=device)
            _compiler_works[device] = bool(torch.allclose(probe(x), torch.nn.functional.silu(x) * 2.0 + 1.0))
        except Exception as exc:  # noqa: BLE001 - any failure of the compiler stack means: no compiler
            log.info("torch.compile unavailable on %s: %s", device, str(exc).splitlines()[0] if str(exc) else exc)
            _compiler_works[device] = False
    return _compiler_works[device]


def resolve_compile(mode: str, device: str) -> bool:
    """Whether the denoiser runs under `torch.compile` (`compiled_denoiser`). `auto`: off, on CPU because it is
    measured no faster there once its warm-up is paid (demo DDPM ~7 % per image once warm, the DDPM-CIFAR10
    shape 0.96x; 1-2 CPU minutes of warm-up per precision and call shape: benchmarks/README.md, "Timestep
    batching, `--compile` and reference models"), on CUDA until benchmarks/gpu_session.sh has measured it; `on`: compile
    where a compiler works, else warn and run eagerly; `off`: never."""
    if mode not in COMPILE_MODES:
        raise OptionError(f"--compile {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode != "on":
        return False
    if not hasattr(torch, "compile") or not compiler_available(device):
        log.warning("--compile on: torch.compile does not work on %s here (no compiler backend); the denoiser runs "
                    "uncompiled", device)
        return False
    return True


#: Denoisers whose compilation failed in this process: later extractions run them eagerly at once instead of
#: paying the failed compilation again.
_compile_failed: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


class _CompiledForward:
    """A module's forward run compiled, falling back to the eager forward for good (with a warning) the first
    time compilation fails; an out-of-memory error propagates, for the caller's retry."""

    def __init__(self, eager, compiled, module: torch.nn.Module) -> None:
        self.eager, self.compiled, self.name, self.failed = eager, compiled, type(module).__name__, False
        self.module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compiler failure of any kind: fall back
            if _is_out_of_memory(exc):
                raise
            self.failed = True
            if (module := self.module()) is not None:
                _compile_failed.add(module)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("--compile: compiling %s failed (%s: %s); running it uncompiled", self.name,
                        type(exc).__name__, first[:200])
            return self.eager(*args, **kwargs)


@contextlib.contextmanager
def compiled_denoiser(adapter: DiffusionAdapter, enabled: bool, compiler=None):
    """While it runs, the adapter's denoiser forward is `torch.compile`d with automatic dynamic shapes (the first
    call shape static; the first other batch size recompiles once with the batch dimension dynamic, and every
    later size reuses that graph: `dynamic=True`, every dimension symbolic, failed in inductor on the
    DDPM-CIFAR10 UNet on CPU with torch 2.13, benchmarks/README.md); afterwards the eager forward is
    back. Forward hooks and the input-gradient path (AOTAutograd compiles the backward) are kept. `compiler`
    stands in for torch.compile (tests)."""
    if not enabled:
        yield
        return
    module = adapter.denoiser
    uncompile(adapter)
    if module in _compile_failed:
        log.warning("--compile: compiling %s failed earlier in this process; running it uncompiled",
                    type(module).__name__)
        yield
        return
    eager = module.forward
    compile_fn = compiler or (lambda fn: torch.compile(fn, dynamic=None))
    try:
        # A later extraction in this process (the next batch plan, an out-of-memory retry) wraps the forward
        # anew; dynamo's cache sits on the forward's code, so its compiled graphs are reused (measured).
        compiled = compile_fn(eager)
    except Exception as exc:  # noqa: BLE001
        log.warning("--compile: torch.compile of %s failed (%s); running it uncompiled", type(module).__name__, exc)
        _compile_failed.add(module)
        yield
        return
    module.forward = _CompiledForward(eager, compiled, module)
    try:
        yield
    finally:
        uncompile(adapter)


def uncompile(adapter: DiffusionAdapter) -> None:
    """The denoiser's eager forward back, if `compiled_denoiser` left it compiled."""
    module = adapter.denoiser
    if isinstance(vars(module).get("forward"), _CompiledForward):
        del module.forward


def _largest_call(config: FeatureConfig, batch_size: int) -> int:
    """Rows of the largest batched model call: a batch times the most groups one family makes (GM's timesteps,
    DL's draws, PIA and PIAN)."""
    return batch_size * max(len(config.multi_timesteps), config.dl_draws, 2)


def resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "16"
        return "32"
    if device == "cpu" and precision == "16":
        raise OptionError("--precision 16: float16 autocast is for CUDA; on CPU use bf16 (fast on CPUs with "
                          "AVX512-BF16 or AMX) or 32")
    if device == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        log.warning("--precision bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX); it is emulated and "
                    "likely slower than --precision 32")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def rendezvous_timeout() -> float:
    """Seconds the ranks of a multi-process extraction have to meet: CDI_RENDEZVOUS_TIMEOUT, else 300."""
    value = os.environ.get("CDI_RENDEZVOUS_TIMEOUT", "").strip()
    if not value:
        return RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(f"CDI_RENDEZVOUS_TIMEOUT {value!r}: must be a positive number of seconds "
                          f"(default {RENDEZVOUS_TIMEOUT_S:g})")
    return seconds


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the CPU allocator's failure (a plain RuntimeError)."""
    message = str(exc).lower()
    return (isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in message
            or "can't allocate memory" in message)


@dataclass(frozen=True)
class ExtractionOptions:
    """How features are computed, never what they are: device, batching, cache, processes, threads.

    `timestep_batching` (auto, on, off; `resolve_timestep_batching`): make each family's several same-shaped
    model calls of a batch (GM/ML's timesteps, DL's draws, PIA and PIAN) as fewer calls of at most
    `max_call_rows` rows (None: a family's calls of a batch in one); out of memory, the rows per call are
    halved down to the batch size before the batch is.

    `compile` (auto, on, off; `resolve_compile`): run the denoiser under `torch.compile` (in a multi-process
    extraction each rank compiles its own); its features are cached apart (compiled kernels round differently).

    `channels_last` (None: on CUDA only): the memory format of the model's activations."""

    batch_size: int = 16
    device: str = "auto"
    progress: bool = True
    cache_dir: str | Path | None = None
    use_cache: bool = True
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    timestep_batching: str = "auto"
    compile: str = "auto"
    channels_last: bool | None = None
    max_call_rows: int | None = None


def extract(
    adapter: DiffusionAdapter,
    records: Sequence[ImageRecord],
    names: Sequence[str],
    config: FeatureConfig | None = None,
    seed: int = 0,
    options: ExtractionOptions | None = None,
    **changes: Any,
) -> ExtractionReport:
    """Features `names` of `records`, in their order, with cache statistics and timings.

    `config` and `seed` say what the features are (they key the cache); `options` how they are computed
    (`ExtractionOptions`); keyword `changes` replace fields of `options` (`extract(..., batch_size=8)`)."""
    return extract_models([adapter], records, names, config, seed, options, **changes)[0]


@dataclass
class _Model:
    """One model of an `extract_models` call: its cache and which of the wanted rows it lacks."""

    adapter: DiffusionAdapter
    cache: FeatureCache
    keys: list[str]  # per record
    unique: list[tuple[str, ImageRecord]]  # (row key, record) of the distinct rows, in batch-plan order
    hits: int | None = None  # rows cached before any pass of this call
    todo: list[tuple[str, ImageRecord]] = field(default_factory=list)  # the rows it lacks, in the same order
    session: str = ""
    seconds: float = 0.0

    @property
    def wanted(self) -> list[str]:
        return [row for row, _ in self.unique]


def extract_models(
    adapters: Sequence[DiffusionAdapter],
    records: Sequence[ImageRecord],
    names: Sequence[str],
    config: FeatureConfig | None = None,
    seed: int = 0,
    options: ExtractionOptions | None = None,
    **changes: Any,
) -> list[ExtractionReport]:
    """`extract` on several models with the same records, names, config and seed (a target and its reference
    models: every noise draw is the same on all of them), one report per model, in order.

    Models that lack the same images (the usual case: none cached, or all) share one engine pass, whose batches
    are decoded, encoded (where the encoders are the same) and noised once for all of them; each model's
    features are the bits `extract` alone gives it, cached under its own fingerprint. A shared pass's wall time
    is split between its models in proportion to their compute time (`ExtractionReport.seconds`)."""
    o = replace(options or ExtractionOptions(), **changes)
    if o.batch_size < 1:
        raise OptionError(f"--batch-size {o.batch_size}: must be a positive integer")
    if o.devices < 1 or o.num_nodes < 1:
        raise OptionError("--devices and --num-nodes must be positive integers")
    config = config or FeatureConfig()
    accelerator = resolve_device(o.device)
    precision = resolve_precision(o.precision, accelerator)
    batched = resolve_timestep_batching(o.timestep_batching, precision, accelerator)
    if o.max_call_rows is not None and o.max_call_rows < 1:
        raise OptionError(f"max_call_rows {o.max_call_rows}: must be a positive number of rows (or None)")
    calls = ModelCalls(batched, o.max_call_rows)
    compiled = resolve_compile(o.compile, accelerator)
    channels_last = accelerator == "cuda" if o.channels_last is None else o.channels_last
    names = tuple(names)

    scratch = None
    if o.use_cache:
        cache_root = Path(o.cache_dir) if o.cache_dir else default_cache_dir()
    else:
        scratch = tempfile.mkdtemp(prefix="cdi-features-")
        cache_root = Path(scratch)
    # Half-precision features differ from float32 ones (~1 %): they are cached apart. Float32 keeps the
    # plain key, so caches written before precision was part of it stay valid.
    key = config.to_dict() if precision == "32" else {**config.to_dict(), "precision": precision}
    if batched:  # a larger batch rounds differently in the last bits (float32: measured ~1e-6 relative)
        key = {**key, "timestep_batching": "on"}
    if compiled:  # fused kernels round differently in the last bits (float32: measured in benchmarks/README.md)
        key = {**key, "compile": "on"}
    models = []
    try:
        for i, adapter in enumerate(adapters):
            conditioning = adapter.info.conditioning
            # Without the cache every model computes every row, even two models of one fingerprint.
            root = cache_root if o.use_cache else cache_root / str(i)
            keys = [_row_key(record, conditioning) for record in records]
            # One row per (image, conditioning): the same image under two labels is computed twice. Sorted by
            # sha256 first, so unconditioned batches are composed exactly as when the key was the sha256.
            unique = sorted(dict(zip(keys, records)).items(), key=lambda item: (item[1].sha256, item[0]))
            models.append(_Model(adapter, FeatureCache.open(root, adapter.info.fingerprint, key, seed), keys,
                                 unique))
        pending = list(models)
        while pending:  # one engine pass per set of models that lack the same rows
            for model in pending:  # as of now: an earlier pass may have filled a cache they share
                cached = model.cache.load(model.wanted, names)
                model.todo = [(row, record) for row, record in model.unique if row not in cached]
                if model.hits is None:  # the first look, before any pass
                    model.hits = len(cached)
                log.info("feature cache %s: %d hit(s), %d miss(es)", model.cache.root,
                         len(model.unique) - len(model.todo), len(model.todo))
            group: list[_Model] = []
            for model in pending:  # never two models of one cache (the same fingerprint) in one pass
                if (not group or _rows(model) == _rows(group[0])) and all(
                        m.cache.root != model.cache.root for m in group):
                    group.append(model)
            pending = [model for model in pending if model not in group]
            _pass(group, names, config, seed, o, accelerator, precision, channels_last, calls, compiled)
        reports = []
        for model in models:
            rows = model.cache.load(model.wanted, names)
            if o.devices * o.num_nodes > 1:
                rows = _wait_for_other_ranks(model.cache, model.wanted, names, rows)
            missing = [record for record, row in zip(records, model.keys) if row not in rows]
            if missing:
                raise FeatureError(f"{missing[0].path}: no features were produced ({len(missing)} image(s)); "
                                   "rerun to resume")
            values = np.stack([rows[row] for row in model.keys])
            _check_finite(values, records, model.keys, names, model.cache, precision)
            reports.append(ExtractionReport(
                values=values, cache_hits=model.hits, cache_misses=len(model.unique) - model.hits,
                seconds=model.seconds,
                family_seconds=model.cache.seconds(model.session) if model.todo else {},  # every rank's, retry's
            ))
        return reports
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _rows(model: _Model) -> list[str]:
    return [row for row, _ in model.todo]


def _pass(group: list[_Model], names, config, seed, o: ExtractionOptions, accelerator, precision, channels_last,
          calls, compiled) -> None:
    """One engine pass of `group`'s models over their (equal) missing rows; its wall time is split between the
    models by their compute time."""
    started = time.perf_counter()
    todo = [record for _, record in group[0].todo]
    session = _session_id(todo, names, group[0].adapter.info.conditioning)
    with contextlib.ExitStack() as stack:
        for model in group:
            model.session = session
            stack.enter_context(half_precision_weights(model.adapter, precision if todo else "32"))
        if todo:
            _extract_missing([(m.adapter, m.cache) for m in group], todo, names, config, seed, o.batch_size,
                             accelerator, o.progress, o.devices, o.num_nodes, o.strategy, precision, channels_last,
                             o.threads, session, calls, compiled)
    if todo and o.devices * o.num_nodes > 1:  # the pass ends when every rank's rows can be read
        for model in group:
            _wait_for_other_ranks(model.cache, model.wanted, names, model.cache.load(model.wanted, names))
    wall = time.perf_counter() - started
    compute = [sum(model.cache.seconds(session).values()) if todo else 0.0 for model in group]
    total = sum(compute)
    for model, own in zip(group, compute):
        model.seconds = wall * own / total if total > 0 else wall / len(group)


def worker_rank() -> int:
    """Global rank of this process when a launcher started it as one of several (0 otherwise)."""
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(variable, "0")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _wait_for_other_ranks(cache: FeatureCache, shas: list[str], names: Sequence[str], rows: dict,
                          timeout_s: float = 600.0) -> dict:
    """The ranks meet at a barrier once their shards are written; on a shared filesystem another node's
    files can still take a while to show: wait until every rank's shards are visible."""
    deadline = time.monotonic() + timeout_s
    while len(rows) < len(shas) and time.monotonic() < deadline:
        time.sleep(1.0)
        rows = cache.load(shas, names)
    return rows


@contextlib.contextmanager
def half_precision_weights(adapter: DiffusionAdapter, precision: str):
    """Keep the denoiser's weights in bf16/fp16 while a half-precision extraction runs, then restore the
    float32 weights bit for bit. Autocast casts every weight to the half type anyway, so the features
    are the same bits; but frozen weights are re-cast on every call (autocast caches casts only of
    weights that require grad), which costs up to a third of a forward+backward on CPU, and the float32
    copy doubles the weights' device memory."""
    if precision not in ("bf16", "16"):
        yield
        return
    module = adapter.denoiser
    dtype = next(module.parameters()).dtype
    saved = {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}
    module.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    try:
        yield
    finally:
        module.to(dtype)
        module.load_state_dict(saved)


def _row_key(record: ImageRecord, conditioning: str) -> str:
    return row_key(record.sha256, conditioning, record.label, record.caption)


def _session_id(todo: Sequence[ImageRecord], names: Sequence[str], conditioning: str = "none") -> str:
    """Shard-name prefix of one extraction: the same in every rank (each node computes the same `todo` before
    the ranks meet), so that rank 0 can sum every rank's seconds per family."""
    keys = (_row_key(record, conditioning) for record in todo)
    digest = hashlib.sha256("\n".join([*names, *keys]).encode()).hexdigest()
    return f"{digest[:12]}-"


def _finished(members, todo, names) -> set[str]:
    """The rows of `todo` every member's cache holds."""
    done = None
    for adapter, cache in members:
        conditioning = adapter.info.conditioning
        rows = cache.load([_row_key(r, conditioning) for r in todo], names)
        done = set(rows) if done is None else done & set(rows)
    return done or set()


def _extract_missing(members, todo, names, config, seed, batch_size, accelerator, progress, devices, num_nodes,
                     strategy, precision, channels_last, threads, session: str, calls: ModelCalls = UNBATCHED,
                     compiled: bool = False) -> None:
    """Extract `todo` into each member's cache (`members`: (adapter, cache) pairs, one pass for all); out of
    memory: with timestep batching, halve the rows per model call (down to the batch size), else halve the
    batch, and go on with the images some member still lacks.
    Only out-of-memory errors are retried: Interrupted and every other error propagate."""
    conditioning = members[0][0].info.conditioning
    while todo:
        try:
            _predict(members, todo, names, config, seed, batch_size, accelerator, progress, devices,
                     num_nodes, strategy, precision, channels_last, threads, session, calls, compiled)
            return
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_out_of_memory(exc):
                raise
            rows = calls.max_rows or _largest_call(config, batch_size)
            if calls.batched and rows > batch_size:
                calls = ModelCalls(True, max(batch_size, rows // 2))
                log.warning("out of memory: retrying with at most %d rows per model call (timestep batching; "
                            "finished batches are kept)", calls.max_rows)
                if accelerator == "cuda":
                    torch.cuda.empty_cache()
                done = _finished(members, todo, names)
                todo = [r for r in todo if _row_key(r, conditioning) not in done]
                continue
            if batch_size == 1:
                finished = len(_finished(members, todo, names))
                raise FeatureError(
                    f"--batch-size: out of memory on {accelerator} even for one image; use a device with more "
                    f"memory, --precision bf16, or fewer features (--access gray); the {finished} image(s) "
                    "finished are cached"
                ) from exc
            batch_size //= 2
            log.warning("out of memory: retrying with batch size %d (finished batches are kept)", batch_size)
            if accelerator == "cuda":
                torch.cuda.empty_cache()
            done = _finished(members, todo, names)
            todo = [r for r in todo if _row_key(r, conditioning) not in done]


def _predict(members, todo, names, config, seed, batch_size, accelerator, progress, devices, num_nodes,
             strategy, precision, channels_last, threads, session: str, calls: ModelCalls = UNBATCHED,
             compiled: bool = False) -> None:
    """One Trainer's pass of every member (adapter, cache) over `todo`, each batch decoded once."""
    adapters = [adapter for adapter, _ in members]
    info = adapters[0].info
    dataset = ImageDataset(todo, info.image_size, info.image_channels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=RankBatchSampler(len(dataset), batch_size), num_workers=0
    )
    module = FeatureExtractor(adapters, names, config, seed, [str(cache.root) for _, cache in members], precision,
                              channels_last, session, threads, calls, compiled)
    world_size = devices * num_nodes
    timeout = rendezvous_timeout() if world_size > 1 else None
    if strategy == "auto" and world_size > 1:
        strategy = "ddp_spawn"  # works from any entry point, the CLI included
    if world_size > 1 and isinstance(strategy, str) and strategy in DDP_START_METHODS:
        from lightning.pytorch.strategies import DDPStrategy

        # Lightning's default waits 30 minutes for a missing node, deaf to Ctrl-C; fail in `timeout` instead.
        strategy = DDPStrategy(start_method=DDP_START_METHODS[strategy], timeout=datetime.timedelta(seconds=timeout))
    callbacks = [ImagesPerSecondBar(len(todo))] if progress else []
    trainer = L.Trainer(
        accelerator="gpu" if accelerator == "cuda" else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,  # RankBatchSampler distributes whole batches
        inference_mode=False,  # GM and NO need input gradients; gradient-free work runs under no_grad
        callbacks=callbacks,
    )
    # The caller handles SIGTERM (the CLI raises Interrupted); Lightning's own handler would first broadcast
    # to the other ranks, which waits for them up to the process group's timeout.
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = _keep_signal_handlers  # module-level: ddp_spawn pickles the trainer
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)  # results travel through the cache
    except SystemExit as exc:
        _stop_other_processes(trainer)
        if isinstance(exc.__context__, KeyboardInterrupt):  # Lightning turns Ctrl-C into exit(1)
            raise Interrupted(signal.SIGINT) from None
        raise
    except Exception as exc:
        if world_size > 1 and (failure := _rendezvous_failure(exc)) is not None:
            _stop_other_processes(trainer)
            raise OptionError(_rendezvous_message(failure, devices, num_nodes, timeout)) from exc
        raise
    except BaseException:  # Interrupted, KeyboardInterrupt: finished shards stay; no process is left running
        _stop_other_processes(trainer)
        raise
    finally:
        if compiled:
            for adapter in adapters:
                uncompile(adapter)  # Lightning skips teardown hooks on some failures
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not sigint:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after an interrupt


def _keep_signal_handlers() -> None:
    """Stands in for Lightning's signal registration: the handlers in place stay."""


def _stop_other_processes(trainer: L.Trainer) -> None:
    """Kill the processes Lightning started for the other ranks (their finished shards are already renamed)."""
    launcher = trainer.strategy.launcher
    if launcher is not None and getattr(launcher, "procs", None):
        with contextlib.suppress(Exception):
            launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))


def _rendezvous_failure(exc: BaseException) -> str | None:
    """The text of a failure of the ranks to meet (raised in this process or, with ddp_spawn, in a rank it
    spawned, whose traceback the error carries); None for any other error."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    distributed = ("DistStoreError", "DistNetworkError", "DistError")
    if "init_process_group" in text and any(name in text for name in distributed):
        return text
    return None


def _rendezvous_message(failure: str, devices: int, num_nodes: int, timeout: float) -> str:
    world = devices * num_nodes
    where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
    joined = re.search(r"(\d+)/(\d+) clients joined", failure)
    if joined:
        arrived, expected = int(joined.group(1)), int(joined.group(2))
        what = (f"only {arrived} of {expected} ranks ({num_nodes} node(s) x {devices} device(s)) joined within "
                f"{timeout:g} s, {expected - arrived} never arrived")
    elif "client socket has timed out" in failure or "trying to connect" in failure:
        what = (f"this node (NODE_RANK {os.environ.get('NODE_RANK', '0')}) could not reach rank 0 at {where} "
                f"within {timeout:g} s ({world} ranks expected)")
    else:
        lines = [line for line in failure.splitlines() if "Dist" in line and ":" in line]
        detail = lines[-1].strip() if lines else "rendezvous failed"
        what = f"the {world} ranks could not meet ({detail})"
    return (f"--num-nodes {num_nodes} --devices {devices}: {what}; check that every node runs the same command "
            f"with the same MASTER_ADDR/MASTER_PORT ({where}, reachable from every node) and its own NODE_RANK "
            f"(0..{num_nodes - 1}), and start every node within {timeout:g} s of the first "
            "(CDI_RENDEZVOUS_TIMEOUT sets the seconds)")


def _check_finite(values: np.ndarray, records: Sequence[ImageRecord], keys: Sequence[str], names: Sequence[str],
                  cache: FeatureCache, precision: str) -> None:
    """Refuse non-finite features, naming the first image; drop them from the cache so a rerun recomputes them."""
    bad_rows = np.where(~np.isfinite(values).all(axis=1))[0]
    if len(bad_rows):
        bad_cols = [names[j] for j in np.where(~np.isfinite(values[bad_rows[0]]))[0]]
        cache.drop({keys[i] for i in bad_rows})
        fix = ("rerun with --precision 32 (half precision can overflow)" if precision in ("bf16", "16")
               else "check the model's weights (they give non-finite output for this input)")
        raise FeatureError(
            f"{records[bad_rows[0]].path}: non-finite feature(s) {', '.join(bad_cols)} "
            f"({len(bad_rows)} image(s) affected); {fix}; the cached features of the other images are kept"
        )
