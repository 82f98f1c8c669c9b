"""What a run knows of a dataset before reading a batch: classes, split sizes, epoch length.

Kept free of TensorFlow: compile mode works from the known sizes below without the data.
"""

from __future__ import annotations

import dataclasses

from poolformer_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  label_names: tuple[str, ...] | None = None

  def batches_per_epoch(self, global_batch_size: int, process_count: int) -> int:
    """Training steps in one epoch: each process takes num_train_examples // process_count
    examples (the rest dropped, so that all take as many steps) in local batches, and the
    epoch's remainder is dropped (batches never straddle epochs)."""
    return ((self.num_train_examples // process_count)
            // local_batch(global_batch_size, process_count))


def local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ConfigError(f"global_batch_size={global_batch_size} must be divisible by the number of "
                      f"processes ({process_count}).")
  return global_batch_size // process_count


# The datasets compile mode knows without reading them (eval: the default eval split).
KNOWN = {
    "imagenet2012": DatasetInfo(num_classes=1000, num_train_examples=1_281_167,
                                num_eval_examples=50_000),
    "digits": DatasetInfo(num_classes=10, num_train_examples=1437, num_eval_examples=360),
}
