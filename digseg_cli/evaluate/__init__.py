"""Evaluation: scoring predictions against a benchmark's ground truth with its protocol, the run behind
`digseg eval`, and its reports."""
