"""The engine: checkpoints, recipes and the forward pass, in torch on the model's device; no gRPC, no threads."""
