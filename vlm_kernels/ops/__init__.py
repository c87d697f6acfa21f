"""One module per op family: argument checks, torch.library registration, autograd, backend table."""
