"""learn2steer's performance benchmarks: ``python -m benchmarks [--quick] [--json OUT.json]``."""
