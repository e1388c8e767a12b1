"""The tensor-parallel building blocks; models compose these and never see torch.distributed."""
