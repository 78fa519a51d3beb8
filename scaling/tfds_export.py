"""A dataset this package has loaded, written as a real TensorFlow Datasets dataset.

    ds = scaling.data.load("folder:/data/cifar10", 32)
    scaling.tfds_export.export(ds, "cifar10_folder", "/data/tensorflow_datasets")
    # then: TFDS_DATA_DIR=/data/tensorflow_datasets scaling train ... dataset=tfds:cifar10_folder

TFDS's own builders (`tfds build imagenet2012 --manual_dir DIR`) need TensorFlow to encode
images; this writes array_record files with the decoded pixels (a uint8 tensor per image, at the
size loaded) through TFDS's `GeneratorBasedBuilder`, which needs no TensorFlow, and
`tfds.data_source` reads them back by name from the data directory, as any prepared dataset.
Each example keeps its index in the loaded split as `id`, since TFDS stores examples in an
order of its own.
"""

from pathlib import Path

import numpy as np

from scaling import ScalingError


def export(dataset, name: str, data_dir) -> Path:
    """Write `dataset` (a `scaling.data.Dataset`) as TFDS dataset `name` (snake_case) under
    `data_dir`; returns the directory of its version. An existing version is refused."""
    import tensorflow_datasets as tfds

    if not name.isidentifier() or name != name.lower():
        raise ScalingError(f"a TFDS name is lower-case letters, digits and '_', got {name!r}")
    shape = dataset.train_images.shape[1:]
    splits = {"train": (dataset.train_images, dataset.train_labels)}
    if dataset.test_images is not None:
        splits["test"] = (dataset.test_images, dataset.test_labels)

    class Export(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        # TFDS would look this file up as a package resource, through a module it lacks here.
        code_path = tfds.core.Path(__file__)

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(dataset.class_names)),
                "id": tfds.features.Scalar(dtype=np.int64),
            })  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

        def _generate_examples(self, images, labels):
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield i, {"image": image, "label": int(label), "id": i}

    Export.name = name
    version = Path(data_dir) / name / str(Export.VERSION)
    if version.exists():
        raise ScalingError(f"{version} exists; remove it or choose another name or data_dir")
    Export(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return version
