"""trainkit_testing: the pytest plugin, fixtures and Hypothesis strategies for training loops."""
