"""The client runtime: answers a Task by calling the user's ClientApp.

Every transport runs tasks through :class:`ClientRuntime`, so seeding, error capture,
result checking and client-side privacy (local DP, :mod:`fedlearn.privacy.local`) are the
same in-process, in a worker pool and in a site daemon.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any

import numpy as np

from fedlearn.drift.client import attach_summary, task_summary
from fedlearn.engine.client_app import ClientApp, ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.client_state import ClientStateStore, MemoryStateStore
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, check_scalars
from fedlearn.engine.threads import single_thread
from fedlearn.errors import FedlearnError
from fedlearn.privacy.local import LocalDPFloor, PrivateTraining


class ClientRuntime:
    """Runs tasks against one ClientApp instance (which may serve many client ids).

    Training goes through :class:`~fedlearn.privacy.local.PrivateTraining`: an update
    is clipped and noised here, before its reply exists, when the task asks for local DP
    (``dp.mode = "local"``) or ``local_dp_floor`` (a site's own ``[privacy]``) demands it.

    Each client's ``ctx.state`` comes from ``states`` (default: in this process) and goes
    back there, as its version of the task's round, after a training or evaluation task
    that succeeded and touched it.
    """

    def __init__(
        self,
        app: ClientApp,
        run_id: str = "",
        local_dp_floor: LocalDPFloor | None = None,
        states: ClientStateStore | None = None,
    ) -> None:
        self.app = app
        self.run_id = run_id
        self.local_dp_floor = local_dp_floor
        self.states: ClientStateStore = MemoryStateStore() if states is None else states
        self._training = PrivateTraining(app, local_dp_floor)
        self._secure: Any = None

    def handle(self, task: Task, arrays: Arrays) -> Reply:
        """Run ``task`` on ``arrays``; any exception becomes a failed Reply."""
        trains = task.stage in (Stage.TRAIN, Stage.SECAGG_SETUP)
        before = task.round if trains else task.round + 1
        load = functools.partial(self.states.load, task.client_id, before)
        ctx = ClientContext(task.client_id, task.round, task.seed, self.run_id, load)
        _seed_frameworks(task.seed)
        try:
            with single_thread():
                if task.stage.secure:
                    reply = self._secure_reply(task, arrays, ctx)
                elif task.stage is Stage.TRAIN:
                    reply = _train_reply(task, self._training.train(arrays, task.config, ctx))
                    reply = attach_summary(reply, self.app, task.config, ctx)
                else:
                    reply = _evaluate_reply(task, self.app.evaluate(arrays, task.config, ctx))
                if ctx.state_used and (trains or task.stage is Stage.EVALUATE):
                    self.states.save(task.client_id, task.round, ctx.state)
                return reply
        except Exception as exc:  # user code may raise anything: it becomes this client's failure
            return Reply(task.stage, task.round, task.client_id, error=describe(exc))

    def _secure_reply(self, task: Task, arrays: Arrays, ctx: ClientContext) -> Reply:
        if self._secure is None:
            from fedlearn.secagg.stages import SecureClientStates

            self._secure = SecureClientStates()
        summary = task_summary(self.app, task.config, ctx, required=True)
        payload, num_examples, metrics = self._secure.handle(
            task, arrays, self._training, ctx, summary
        )
        return Reply(
            task.stage,
            task.round,
            task.client_id,
            num_examples=num_examples,
            metrics=metrics,
            payload=payload,
        )


def describe(exc: BaseException) -> str:
    """One line naming an exception and where user code raised it."""
    if isinstance(exc, FedlearnError):
        return f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _train_reply(task: Task, result: Any) -> Reply:
    if not isinstance(result, TrainResult):
        raise TypeError(f"train() must return TrainResult, not {type(result).__name__}")
    arrays = {str(k): np.asarray(v) for k, v in result.arrays.items()}
    return Reply(
        task.stage,
        task.round,
        task.client_id,
        num_examples=_count(result.num_examples),
        arrays=arrays,
        metrics=check_scalars(result.metrics, "metrics"),
    )


def _evaluate_reply(task: Task, result: Any) -> Reply:
    if not isinstance(result, EvaluateResult):
        raise TypeError(f"evaluate() must return EvaluateResult, not {type(result).__name__}")
    return Reply(
        task.stage,
        task.round,
        task.client_id,
        num_examples=_count(result.num_examples),
        loss=float(result.loss),
        metrics=check_scalars(result.metrics, "metrics"),
    )


def _count(value: Any) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"num_examples must be an int, not {type(value).__name__}")
    return value


def _seed_frameworks(seed: int) -> None:
    """Seed torch's generators for a task (when torch is loaded): the CPU generator, and
    CUDA's and MPS's where the device exists (CUDA's queued until CUDA starts).

    Not ``torch.manual_seed``: that also queues a seeding for every lazily started backend
    with a formatted traceback of the caller, about 150 microseconds per task on a
    CPU-only machine, which was most of what a numpy ClientApp paid once anything had
    imported torch (BENCHMARKS.md section 8)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
