"""Console scripts: one thin main() per command.

blues-prepare, blues-train, blues-generate, blues-probe, blues-submit; python -m blues.cli.tokenizer.
"""
