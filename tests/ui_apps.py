"""A tabular torch ClientApp for the live page's tests: each training task first sleeps
``sleep_s`` (so a round lasts long enough to watch) and client ``fail_client`` refuses to
train, with a reason the page must show."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from clients.tabular import LabelledData, build_model
from fedlearn.apps.torch_app import TorchClientApp
from fedlearn.engine.client_app import ClientContext, TrainResult
from fedlearn.engine.records import Arrays, Config


class SlowTabular(TorchClientApp):
    """clients.tabular's MLP, slowed, with one client that always fails."""

    sleep_s = 0.0
    fail_client = -1

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        time.sleep(self.sleep_s)
        if ctx.client_id == self.fail_client:
            raise RuntimeError(f"client {ctx.client_id} refuses to train (injected)")
        return super().train(arrays, config, ctx)


def make_app(
    data: LabelledData, *, sleep_s: float = 0.0, fail_client: int = -1, **params: Any
) -> SlowTabular:
    """The ``client.app`` factory."""
    in_features = data.client(0).x_train.shape[1]
    app = SlowTabular(partial(build_model, in_features, data.num_classes), data, **params)
    app.sleep_s, app.fail_client = sleep_s, fail_client
    return app
