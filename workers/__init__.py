"""What one trial runs: the benchmarks, the VLM and the two-stage DeepSpeed train loop.

Free of Ray (the Ray adapters live in tokenscale.orchestrator.driver); a single trial runs
alone with `python -m tokenscale.workers TRIAL.yaml` or under torchrun.
"""
