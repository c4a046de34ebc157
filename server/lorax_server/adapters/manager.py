"""The adapter cache tiers: disk (fetched files) → host memory (validated factors, LRU) → device
(installed on the model's linears under the router's adapter index).

Fetching, validation, merging and the host → device copy of large adapters run on loader threads,
off the engine thread; `install`/`offload` (a few dict updates) run on the engine thread, between
steps. A small adapter that is already on the host or in a local directory (`is_quick`) is fetched
and prepared between steps too: a job handed to a loader thread is noticed only when the running
step ends, so each hop would add a whole step to the adapter's first request.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat_template import ChatTemplateFiles, read_chat_template
from .loader import MEDUSA, AdapterLoadError, adapter_nbytes, load_adapter
from .lora import LoraModuleWeights, attach_lora
from .medusa import MedusaHeads
from .sources import ADAPTER_SAFETENSORS, AdapterSource

Modules = dict[str, LoraModuleWeights | MedusaHeads]  # module name → factors; MEDUSA → the Medusa heads
MAX_TEMPLATES_KEPT = 1024  # chat templates are a few KiB: kept for far more adapters than factors are
# Adapters up to this size are read and prepared between two steps (`AdapterManager.is_quick`): a few
# milliseconds from a local disk or host memory, against a step's wait for a loader thread's result.
QUICK_BYTES = 16 * 2**20


class AdapterInUse(RuntimeError):
    pass


class AdapterBudgetExceeded(RuntimeError):
    pass


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter (or a merge of several) as a request names it."""

    ids: tuple[str, ...]
    source: AdapterSource = AdapterSource.HUB
    weights: tuple[float, ...] = ()
    merge_strategy: str = ""
    density: float = 1.0
    majority_sign_method: str = "total"
    api_token: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Callers may name the source as LoRAX's string ("local"); it is kept as the enum from here on.
        object.__setattr__(self, "source", AdapterSource.parse(self.source))

    @property
    def token_hash(self) -> str:
        """Private adapters are cached per (adapter, token): a different token never reuses them."""
        return hashlib.sha256(self.api_token.encode()).hexdigest()[:16] if self.api_token else ""

    @property
    def is_merge(self) -> bool:
        """Several adapters, or one with a merge strategy (its weight applies): computed, not read."""
        return len(self.ids) > 1 or bool(self.merge_strategy)

    def part_key(self, adapter_id: str) -> tuple:
        """The host cache's key of one adapter the request names (a merge's parts are cached apart)."""
        return (adapter_id, self.source, self.token_hash)

    @property
    def key(self) -> tuple:
        return (self.ids, self.source, self.weights, self.merge_strategy, self.density,
                self.majority_sign_method, self.token_hash)  # fmt: skip

    def describe(self) -> str:
        return "+".join(self.ids) if len(self.ids) > 1 else self.ids[0]


Fetch = Callable[[str, AdapterSource, "str | None"], Path]  # (adapter id, source, api token) → local directory


class AdapterManager:
    def __init__(
        self,
        model,  # noqa: ANN001 - a CausalLM; typed loosely to keep models free of adapter imports
        fetch: Fetch,
        device_budget_bytes: int,
        host_cache_bytes: int = 4 * 2**30,
    ) -> None:
        self.model = model
        self.fetch = fetch
        self.device = model.device
        self.dtype = model.dtype
        self.targets = model.adaptable_linears()  # module name → (linear, fused part)
        self._slots = attach_lora(self.targets, self.dtype)  # id(linear) → its LoRA hook
        self.device_budget_bytes = device_budget_bytes
        self.host_cache_bytes = host_cache_bytes
        self.installed: dict[int, tuple[tuple, int]] = {}  # index → (request key, bytes on device)
        self._host: OrderedDict[tuple, Modules] = OrderedDict()  # (id, source, token hash) → host factors
        self._host_bytes = 0  # their total, kept as they come and go (a load between steps sums nothing)
        self._templates: OrderedDict[tuple, ChatTemplateFiles | None] = OrderedDict()  # same keys
        self._lock = threading.Lock()
        self.medusa: dict[int, MedusaHeads] = {}  # index → the Medusa heads of the adapter installed there
        # The server's default adapter (`--default-adapter-id`): its Medusa heads, if it has some, draft
        # for the requests whose own adapter has none (as LoRAX does).
        self.default_adapter: tuple[str, AdapterSource] | None = None
        self.default_index: int | None = None

    # ------------------------------------------------------------------ loader threads
    def _host_modules(self, adapter_id: str, request: AdapterRequest) -> Modules:
        key = request.part_key(adapter_id)
        with self._lock:
            if key in self._host:
                self._host.move_to_end(key)
                return self._host[key]
        adapter_dir = self.fetch(adapter_id, request.source, request.api_token)
        modules = load_adapter(adapter_dir, self.targets, self.model.config, self.dtype)
        self._remember_template(key, adapter_dir)
        with self._lock:
            self._keep_on_host(key, modules)
        return modules

    def _keep_on_host(self, key: tuple, modules: Modules) -> None:
        """(Under the lock.) Keep `modules` on the host under `key`; past `host_cache_bytes` the least
        recently used are dropped (the newest always stays). Merges are kept the same way."""
        old = self._host.pop(key, None)
        if old is not None:
            self._host_bytes -= adapter_nbytes(old)
        self._host[key] = modules
        self._host_bytes += adapter_nbytes(modules)
        while len(self._host) > 1 and self._host_bytes > self.host_cache_bytes:
            _, dropped = self._host.popitem(last=False)
            self._host_bytes -= adapter_nbytes(dropped)

    def _modules(self, request: AdapterRequest) -> Modules:
        """The request's factors on the host; a merge is computed once per distinct request and cached."""
        parts = [self._host_modules(i, request) for i in request.ids]
        if not request.is_merge:  # a plain adapter_id
            return parts[0]
        with self._lock:
            if request.key in self._host:
                self._host.move_to_end(request.key)
                return self._host[request.key]
        merged = self._merge(parts, request)
        with self._lock:
            self._keep_on_host(request.key, merged)
        return merged

    def is_quick(self, request: AdapterRequest) -> bool:
        """Whether fetching and preparing `request` takes milliseconds: its factors, at most
        QUICK_BYTES, are on the host already, or it is one adapter read from a local directory whose
        weights file is at most QUICK_BYTES. Merges (computed once) and remote fetches are not."""
        with self._lock:
            cached = self._host.get(request.key if request.is_merge else request.part_key(request.ids[0]))
        if cached is not None:
            return adapter_nbytes(cached) <= QUICK_BYTES
        if request.is_merge:
            return False
        folder = Path(request.ids[0]).expanduser()
        if request.source not in (AdapterSource.LOCAL, AdapterSource.HUB) or not folder.is_dir():
            return False  # a hub id that names a local directory is read from it, as LoRAX does
        weights = folder / ADAPTER_SAFETENSORS
        return weights.is_file() and weights.stat().st_size <= QUICK_BYTES

    def download(self, request: AdapterRequest) -> float:
        """Fetch and validate every adapter of the request; returns its share of the adapter memory
        budget once on the device."""
        return self.budget_share(self._modules(request))

    def budget_share(self, modules: Modules) -> float:
        """The share of the adapter memory budget `modules` take on the device."""
        return adapter_nbytes(modules) / max(self.device_budget_bytes, 1)

    def _remember_template(self, key: tuple, adapter_dir: Path) -> ChatTemplateFiles | None:
        template = read_chat_template(adapter_dir)
        with self._lock:
            self._templates[key] = template
            self._templates.move_to_end(key)
            while len(self._templates) > MAX_TEMPLATES_KEPT:
                self._templates.popitem(last=False)
        return template

    def chat_template(self, request: AdapterRequest) -> ChatTemplateFiles | None:
        """(Loader thread, after `download`.) The chat template the request's adapter ships; of a
        merge, the first adapter's that has one."""
        for adapter_id in request.ids:
            key = request.part_key(adapter_id)
            with self._lock:
                known = key in self._templates
                template = self._templates.get(key)
            if not known:  # forgotten since it was fetched: its files are still in the disk cache
                template = self._remember_template(key, self.fetch(adapter_id, request.source, request.api_token))
            if template is not None:
                return template
        return None

    def prepare(self, request: AdapterRequest) -> Modules:
        """The request's (merged) factors, this rank's slice of them (`layers.parallel.LinearShard`),
        copied to the device, ready to install."""
        prepared: Modules = {}
        for name, m in self._modules(request).items():
            if isinstance(m, MedusaHeads):  # every rank proposes from its full copy
                prepared[name] = m.to(self.device)
                continue
            linear, part = self.targets[name]
            if linear.shard is None and m.lora_a.device == self.device:  # the host's copy is the device's
                prepared[name] = m
                continue
            a, b = (m.lora_a, m.lora_b) if linear.shard is None else linear.shard.lora(part, m.lora_a, m.lora_b)
            prepared[name] = LoraModuleWeights(a.to(self.device), b.to(self.device), m.scale)
        return prepared

    def _merge(self, parts: list[Modules], request: AdapterRequest) -> Modules:
        from .merge import MergeSpec, merge_adapters

        if any(MEDUSA in part for part in parts):
            raise AdapterLoadError(f"cannot merge {request.describe()}: Medusa heads cannot be merged")
        try:
            spec = MergeSpec(
                strategy=request.merge_strategy or "linear",
                weights=request.weights or tuple(1.0 for _ in parts),
                density=request.density,
                majority_sign_method=request.majority_sign_method or "total",
            )
            spec.validate(len(parts))
            # In the model's dtype, as merges always were: 16-bit parts (`lora.kept_dtype`) widen exactly.
            widen = lambda m: LoraModuleWeights(m.lora_a.to(self.dtype), m.lora_b.to(self.dtype), m.scale)  # noqa: E731
            widened = [{name: widen(m) for name, m in part.items()} for part in parts]
            return merge_adapters(widened, spec)
        except ValueError as e:
            raise AdapterLoadError(f"cannot merge {request.describe()}: {e}") from e

    # ------------------------------------------------------------------ engine thread
    def fits(self, index: int, modules: Modules) -> bool:
        """Whether `modules` fit the adapter memory budget once installed at `index`."""
        used = sum(b for i, (_, b) in self.installed.items() if i != index)
        return used + adapter_nbytes(modules) <= self.device_budget_bytes

    def install(self, index: int, request: AdapterRequest, modules: Modules) -> None:
        if index < 1:
            raise ValueError("adapter index 0 is the base model")
        nbytes = adapter_nbytes(modules)
        if not self.fits(index, modules):
            used = sum(b for i, (_, b) in self.installed.items() if i != index)
            raise AdapterBudgetExceeded(
                f"adapter {request.describe()} needs {nbytes} bytes; {self.device_budget_bytes - used} of the "
                f"adapter memory budget ({self.device_budget_bytes} bytes) are free"
            )
        self._uninstall(index)
        by_linear: dict[int, dict[int, LoraModuleWeights]] = {}  # id(linear) → fused part → factors
        for name, weights in modules.items():
            if isinstance(weights, MedusaHeads):
                continue
            linear, part = self.targets[name]
            by_linear.setdefault(id(linear), {})[part] = weights
        for key, parts in by_linear.items():
            self._slots[key].install(index, parts)
        if MEDUSA in modules:
            self.medusa[index] = modules[MEDUSA]
        if self.default_adapter == (request.ids[0], request.source) and len(request.ids) == 1:
            self.default_index = index
        self.installed[index] = (request.key, nbytes)

    def installed_key(self, index: int) -> tuple:
        """The key of the adapter (or merge) installed at `index`."""
        return self.installed[index][0]

    def is_installed(self, index: int, request: AdapterRequest | None = None) -> bool:
        entry = self.installed.get(index)
        return entry is not None and (request is None or entry[0] == request.key)

    def offload(self, index: int) -> bool:
        if index not in self.installed:
            return False
        self._uninstall(index)
        return True

    def _uninstall(self, index: int) -> None:
        for slots in self._slots.values():
            slots.remove(index)
        self.installed.pop(index, None)
        self.medusa.pop(index, None)
        if self.default_index == index:
            self.default_index = None

    def medusa_for(self, index: int) -> MedusaHeads | None:
        """The Medusa heads that draft for requests on adapter `index` (0: the base model): its own,
        else the default adapter's."""
        own = self.medusa.get(index)
        return own if own is not None else self.medusa.get(self.default_index)

    @property
    def device_bytes(self) -> int:
        return sum(b for _, b in self.installed.values())


def device_budget(device: torch.device, fraction: float) -> int:
    """Bytes of adapter memory: a fraction of the GPU's total memory, or of available RAM on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * fraction)
    import psutil

    return int(psutil.virtual_memory().available * fraction)
