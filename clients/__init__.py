"""Example ClientApps built on :class:`fedlearn.torch_app.TorchClientApp`."""
