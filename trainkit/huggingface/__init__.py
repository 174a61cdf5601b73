"""``trainkit.huggingface``: Hugging Face integrations, as ``ray.train.huggingface``.

``trainkit.huggingface.transformers`` holds ``RayTrainReportCallback`` and ``prepare_trainer``
for a ``transformers.Trainer`` inside a trainkit training function (docs/frameworks.md).
Importing this package imports nothing from Hugging Face.
"""
