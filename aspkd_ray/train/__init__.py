"""Ray Train: the ASPKD round loop on a TorchTrainer worker group (no algorithm code here)."""
