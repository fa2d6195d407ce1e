"""Developer scripts that are neither product code nor tests: the playground's documentation screenshots
(`python -m tools.screenshots`) and the zero-shot classify evaluation (`python -m tools.eval_classify`). They may use
the helpers in tests/support; nothing in server/ or loom_kernels/ imports them (tests/test_architecture.py)."""
