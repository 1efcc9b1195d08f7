"""The model registry and what feeds it: versions, aliases and the publish gate,
publishing from runs, the serving spec stored with each version, MLflow export."""
