"""Integrations with training libraries, each an optional import of its own:

- `kdkernels.integrations.transformers`: Hugging Face Transformers (`KDForCausalLM`,
  `distillation_loss`, `KDTrainer`, `TAIDCallback`; docs/distilling.md).
- `kdkernels.integrations.trl`: TRL's GKD and distillation trainers.
- `kdkernels.integrations.liger`: Liger-Kernel's distillation losses mapped to kdkernels.

Importing `kdkernels` or this package imports none of those libraries.
"""
