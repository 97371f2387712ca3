"""Fine-tuning: SFT, LoRA, continued pretraining, distillation and DPO on the one training loop.

Every method is a `haina.train.trainer.Trainer` subclass that overrides its small steps (the batch,
the loss, the trainable parameters, what a checkpoint holds); none copies the loop.
"""
