"""The serving graph's holder: the served model's state, and the one place that swaps it.

`Serving` is built once by the app factory. `start` brings the first model up; `switch` loads
another checkpoint, warms it up and loads its gallery namespace beside the serving one, then swaps
both at once (requests already running finish on the old pair, so an answer never mixes one model's
embeddings with another's gallery) and retires the old state once its last request is done.
Routes reach the current state through `current` (pinned per request by `service.routes.deps`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from index.errors import BadRequest, Conflict, NotReady, StoreUnavailable
from index.records import Store
from model.checkpoint import CheckpointError, LoadedEncoder, load_encoder
from service.metrics import Metrics
from service.settings import Settings
from service.state import AppState, build_serving, close_serving

log = logging.getLogger("rice.serving")


@dataclass(frozen=True)
class SwitchResult:
    model_version: str
    previous_model_version: str
    switched: bool
    gallery_items: int


class Serving:
    def __init__(self, settings: Settings, metrics: Metrics, store: Store) -> None:
        self.settings, self.metrics, self.store = settings, metrics, store
        self._state: AppState | None = None
        self._switching = asyncio.Lock()

    @property
    def current(self) -> AppState:
        """The state serving right now; NotReady before `start` and after `close`."""
        if self._state is None:
            raise NotReady("the service is starting")
        return self._state

    async def start(self, loaded: LoadedEncoder) -> None:
        state = await asyncio.to_thread(build_serving, self.settings, loaded, self.store, self.metrics)
        state.batcher.start()
        self._state = state

    async def close(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            await close_serving(state)  # uvicorn has drained in-flight HTTP requests; finish what is queued

    async def switch(self, checkpoint: str | None, min_gallery_items: int = 0) -> SwitchResult:
        """Serve `checkpoint` (None: the built-in encoder). BadRequest for a bad checkpoint or too few
        gallery items, Conflict while another switch runs, NotReady when the new model cannot come up
        (the served model is unchanged in every failure)."""
        if self._switching.locked():
            raise Conflict("a model switch is already in progress")
        async with self._switching:
            old = self.current
            try:
                loaded = await asyncio.to_thread(load_encoder, checkpoint)
            except CheckpointError as exc:
                raise BadRequest(str(exc)) from exc
            if loaded.model_version == old.engine.model_version:
                # Already served: pick up what another process (rice reindex) wrote to this model's
                # namespace; the embedded store has no change log that would bring it here by itself.
                await asyncio.to_thread(old.replica.sync)
                version = loaded.model_version
                return SwitchResult(version, version, False, len(old.replica.gallery))
            new = await self._bring_up(loaded)
            items = len(new.replica.gallery)
            if items < min_gallery_items:
                await close_serving(new)
                raise BadRequest(
                    f"model {new.engine.model_version} has {items} gallery items, fewer than min_gallery_items={min_gallery_items}"
                )
            self._state = new  # one assignment: the next request sees the new pair
            log.info("switched model %s -> %s (%d gallery items)", old.engine.model_version, new.engine.model_version, items)
        # Retire the old model only once its last request is done: requests that started on it finish on it.
        if not await old.idle(self.settings.drain_timeout_s):
            log.warning("old model %s still busy after %.0f s; closing it", old.engine.model_version, self.settings.drain_timeout_s)
        await close_serving(old)
        return SwitchResult(new.engine.model_version, old.engine.model_version, True, items)

    async def _bring_up(self, loaded: LoadedEncoder) -> AppState:
        try:
            new = await asyncio.to_thread(build_serving, self.settings, loaded, self.store, self.metrics)
        except StoreUnavailable as exc:
            raise NotReady(f"gallery store unavailable; the served model is unchanged: {exc}") from exc
        except Exception as exc:  # e.g. out of device memory at warm-up: the server's problem, not the request's
            log.exception("model switch to %s failed", loaded.model_version)
            why = type(exc).__name__
            raise NotReady(f"could not bring up model {loaded.model_version} ({why}); the served model is unchanged") from exc
        new.batcher.start()
        return new
