"""deepspeed --num_gpus N launch/train.py --deepspeed_config ds_configs/zero2.json [--config C.yaml] [key=value ...]

The per-rank entry the deepspeed launcher runs; the same as `deepspeed --module blues.train`.
"""
from blues.cli.train import entry_point

if __name__ == "__main__":
    entry_point()
