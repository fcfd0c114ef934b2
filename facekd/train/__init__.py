"""facekd.train: the training loop that composes data, models and a distillation method.

- :func:`facekd.train.trainer.train` (``facekd distill RECIPE``): one process or DDP under
  torchrun, AMP on CUDA, Partial FC, resumable checkpoints, logs, run folder.
- :mod:`facekd.train.cache` (``facekd teacher cache``): teacher embeddings of every image
  and its mirror, so distillation costs about as much as training the student alone.
- :mod:`facekd.train.recipe`: the typed recipe schema.

Submodules are imported on use; importing this package stays free of torch.
"""
