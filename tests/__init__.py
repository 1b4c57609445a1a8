"""MeterFlow's tests: a folder per package, the contract suites every backend passes, and the harness."""
