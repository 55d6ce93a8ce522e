"""The loaded models: an LRU of at most `max_models`, each loaded once even when two requests ask at once, and
warmed up by one short call before its first comparison.

Evicting a model drops the pool's reference to it (and its cached baselines); a request still running on it keeps
it alive until it ends, and the memory is freed then.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict

import torch

from accel.app.limits import AppInputError
from accel.app.models import LoadedModel, load

MAX_NAME_CHARS = 300
log = logging.getLogger("accel.app")


class ModelPool:
    def __init__(self, max_models: int = 2, device: str | torch.device = "cpu"):
        if max_models < 1:
            raise AppInputError(f"max_models must be >= 1, got {max_models}")
        self.max_models = max_models
        self.device = torch.device(device)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        with self._lock:
            return list(self._models)

    def peek(self, name: str) -> LoadedModel | None:
        """The loaded model `name`, or None; never loads."""
        with self._lock:
            return self._models.get(name)

    def get(self, name: str) -> LoadedModel:
        """The loaded model `name`, loading it (and its capabilities) if needed."""
        name = _clean(name)
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # a second request for the same model waits for the first one's load
            with self._lock:
                if name in self._models:
                    self._models.move_to_end(name)
                    return self._models[name]
            from accel.app.capabilities import capabilities

            model = load(name, self.device)
            model.capabilities = capabilities(model)
            _warm_up(model)
            with self._lock:
                self._models[name] = model
                self._loading.pop(name, None)
                evicted = [self._models.popitem(last=False) for _ in range(len(self._models) - self.max_models)]
        if evicted:
            del evicted
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return model


def _warm_up(model: LoadedModel) -> None:
    """One short untimed call (2 denoising steps, or 1 new token), so that the first baseline is not charged with
    what only a first call pays (allocations, lazy initialisation) and the first speedup is not inflated by it."""
    from accel.app.models import Request

    steps = 2 if model.kind != "vlm" else None
    try:
        model.run(Request("", 0, steps, None, None, 1), "warm-up")
    except Exception:  # noqa: BLE001  (only a warm-up: a model that needs more is timed cold, and runs as asked)
        log.warning("warm-up call of %s failed; its first comparison is timed cold", model.name, exc_info=True)


def _clean(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise AppInputError("choose a model: pick one from the list, or type a local folder or a Hub id")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise AppInputError(f"the model name has {len(name)} characters; the limit is {MAX_NAME_CHARS}")
    return name
