"""Example ClientApps built on :class:`fedlearn.apps.torch_app.TorchClientApp`."""
