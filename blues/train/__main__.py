"""`python -m blues.train` / `deepspeed --module blues.train ...`: the blues-train command.

The deepspeed launcher starts each rank as `python -m <module>`, and users' scripts name
blues.train. The command lives in blues.cli.train (the top layer); it is run by name, not imported,
because blues.train must not depend on blues.cli (tests/test_imports.py).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("blues.cli.train", run_name="__main__", alter_sys=True)
