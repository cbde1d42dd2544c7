"""Training: pre-training and SFT with the paper's recipe, on one process or under torchrun (DDP/FSDP, experts)."""
