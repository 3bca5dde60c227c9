"""deepspeed --num_gpus N launch/train.py --deepspeed_config ds_configs/zero2.json [--config C.yaml] [key=value ...]

The per-rank entry the deepspeed launcher runs; the same as `deepspeed --module blues.train`.
"""
import sys

from blues.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
