"""Offline real datasets and federated partitioning.

Loaders (:func:`load_dataset` and friends) read data bundled with installed
packages only; partitioners (:mod:`fedlearn.data.partition`) split sample
indices among clients; :class:`FederatedDataset` adds per-client train/test
splits and a pooled centralized view.
"""

from fedlearn.data.datasets import (
    DATASET_NAMES,
    SHAKESPEARE_OOV_ID,
    SHAKESPEARE_VOCAB,
    Dataset,
    decode_chars,
    encode_chars,
    load_breast_cancer,
    load_dataset,
    load_digits,
    load_mnist5k,
    load_shakespeare,
    load_wine,
    shakespeare_role_texts,
)
from fedlearn.data.federated import (
    PARTITIONER_NAMES,
    ClientData,
    FederatedDataset,
    partition_dataset,
)
from fedlearn.data.partition import dirichlet, iid, natural, shards

__all__ = [
    "DATASET_NAMES",
    "PARTITIONER_NAMES",
    "SHAKESPEARE_OOV_ID",
    "SHAKESPEARE_VOCAB",
    "ClientData",
    "Dataset",
    "FederatedDataset",
    "decode_chars",
    "dirichlet",
    "encode_chars",
    "iid",
    "load_breast_cancer",
    "load_dataset",
    "load_digits",
    "load_mnist5k",
    "load_shakespeare",
    "load_wine",
    "natural",
    "partition_dataset",
    "shakespeare_role_texts",
    "shards",
]
