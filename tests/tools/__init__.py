"""The tools around MeterFlow: the bench regression guard, the paired measurements, the load test."""
