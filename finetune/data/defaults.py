"""The data defaults, stated once for the API (`ImageFolderData`, `ImageSplits.scan`,
`finetune.functional.data_load`) and the CLI (`finetune train`) alike.

- `VAL_SPLIT`: the share of each class's training images held out for validation: a fifth of
  UC Merced's 80 per class is 16, enough for a validation accuracy that tells settings apart.
- `AUGMENT`: training images are not augmented unless asked ("none"; the policies are in
  `finetune.data.transforms.AUGMENTATIONS`). Un-augmented images are decoded
  once and let frozen strategies train on cached activations; on the small sets this library
  is for, the quick comparison measured higher accuracy without augmentation (UC Merced,
  three seeds: +3 to +5 points per strategy, docs/benchmarks.md).
"""

VAL_SPLIT = 0.2
AUGMENT = "none"
