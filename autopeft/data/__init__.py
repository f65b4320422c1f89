"""Datasets: a registry of readers (flowers102, the FGVC sets cub200 / nabirds / stanford_dogs / stanford_cars,
vtab1k/<task>, imagefolder, cifar10/100, digits, fashion_mnist), their split protocols and the backbone's
preprocessing.

    splits = load_dataset("digits", **data_config("vit_base_patch16_224"))
    loader = DataLoader(splits.train, batch_size=64, shuffle=True)

`name` may also be the path of a folder of class sub-folders (read as an imagefolder). A new reader is a function
`Request -> DataSplits` decorated with `@register_dataset("name")` in a module imported below.
"""

from __future__ import annotations

from autopeft.data import arrays, cifar, fgvc, fgvc_mat, flowers, folder, synthetic, vtab  # noqa: F401  (registering)
from autopeft.data.base import (
    DatasetInfo,
    DataSplits,
    Request,
    dataset_info,
    default_root,
    list_datasets,
    load_dataset,
    register_dataset,
)
from autopeft.data.datasets import ImageFileDataset, TensorImageDataset, stratified_split
from autopeft.data.transforms import TransformSettings, data_config
from autopeft.data.vtab import GROUPS as VTAB_GROUPS
from autopeft.data.vtab import TASKS as VTAB_TASKS

__all__ = [
    "DatasetInfo",
    "DataSplits",
    "ImageFileDataset",
    "Request",
    "TensorImageDataset",
    "TransformSettings",
    "VTAB_GROUPS",
    "VTAB_TASKS",
    "data_config",
    "dataset_info",
    "default_root",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "stratified_split",
]
