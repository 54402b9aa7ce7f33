"""Diagnostics: how good the policy is (held-out metrics) and how good the training signal is."""
