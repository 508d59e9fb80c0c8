"""Graph front-ends: torch.fx traces of nn.Modules (with the reader of untraced code), TorchScript and ATen graphs."""
