"""Preference data for MPO: sampling answers (sample.py, in the prompt versions of prompts.py), pairs by
correctness (pairs.py), and rejected answers by dropout next-token prediction (dropout_ntp.py)."""
