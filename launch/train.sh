# bash launch/train.sh --nproc_per_node 2 --deepspeed_config ds_configs/zero2.json [--preset tiny | --config C.yaml] [--memory_budget 3GB] [--headroom 0.9] [--target_tokens N] [--no_probe] [key=value ...]
#
# One command: the memory probe (blues-probe) finds the largest micro-batch per device and the
# gradient accumulation for --target_tokens, then the deepspeed launcher trains with that config.
#   launcher flags:  --nproc_per_node N (ranks on this machine; deepspeed's --num_gpus N) |
#                    --hostfile F | --include S | --exclude S, --num_nodes N, --master_port P,
#                    --master_addr A (as for `deepspeed`; on a machine without GPUs
#                    --nproc_per_node N starts N CPU ranks)
#   probe flags:     --memory_budget B (per rank; required meaning on CPU), --headroom H,
#                    --target_tokens N, --router_skew S, --no_probe (train with the config as given)
#   everything else  (--preset/--config, --deepspeed_config, --resume, key=value ...) goes to
#                    blues.train; --preset/--config, --deepspeed_config and key=value also to the probe.
# The probe runs on this machine with this machine's ranks: with a multi-host hostfile it sees
# fewer ranks than training, so ZeRO shards less and its answer is on the safe side.
set -euo pipefail

launcher=()
probe=()
common=()
train_only=()
ds_config=""
nproc_per_node=""
hostfile=""
include=""
exclude=""
do_probe=1
while [ $# -gt 0 ]; do
    case "$1" in
        # --num_gpus: the old spelling, still accepted; deepspeed's own flag for ranks per node.
        --nproc_per_node|--num_gpus)
            nproc_per_node=$2; launcher+=(--num_gpus "$2"); shift 2 ;;
        --num_nodes|--master_port|--master_addr)
            launcher+=("$1" "$2"); shift 2 ;;
        --hostfile) hostfile=$2; launcher+=("$1" "$2"); shift 2 ;;
        --include) include=$2; launcher+=("$1" "$2"); shift 2 ;;
        --exclude) exclude=$2; launcher+=("$1" "$2"); shift 2 ;;
        --memory_budget|--headroom|--target_tokens|--router_skew|--max_micro_batch|--trial_timeout)
            probe+=("$1" "$2"); shift 2 ;;
        --no_probe) do_probe=0; shift ;;
        --deepspeed_config|--ds_config) ds_config=$2; shift 2 ;;
        --preset|--config) common+=("$1" "$2"); shift 2 ;;
        --resume|--prompt|--progress) train_only+=("$1" "$2"); shift 2 ;;
        --no_export) train_only+=("$1"); shift ;;
        -h|--help) sed -n '1,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        --*) echo "launch/train.sh: error: unknown option $1 (see bash launch/train.sh --help)" >&2; exit 2 ;;
        *=*) common+=("$1"); shift ;;
        *) echo "launch/train.sh: error: unexpected argument '$1': expected key=value" >&2; exit 2 ;;
    esac
done
[ -n "$ds_config" ] || { echo "launch/train.sh: error: --deepspeed_config is required" >&2; exit 2; }

if [ "$do_probe" = 1 ]; then
    # This machine's ranks, read from the launcher flags with deepspeed's own parser (which logs to
    # stdout: the answer is the last line).
    nproc=$nproc_per_node
    [ -n "$nproc" ] || nproc=$(python - "$hostfile" "$include" "$exclude" <<'EOF' | tail -n 1
import socket, sys
from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion
hostfile, include, exclude = sys.argv[1:]
pool = fetch_hostfile(hostfile) if hostfile else None
if not pool:
    import torch
    pool = {"localhost": torch.cuda.device_count() or 1}
active = parse_inclusion_exclusion(pool, include, exclude)
me = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}
local = [slots for host, slots in active.items() if host in me] or list(active.values())[:1]
print(len(local[0]))
EOF
)
    # The probe's folder: <out_dir>/probe for the out_dir training will use.
    out_dir=$(python -c 'import sys
from blues.presets import load_config
a = sys.argv[1:]
config = a[a.index("--config") + 1] if "--config" in a else None
preset = a[a.index("--preset") + 1] if "--preset" in a else None
print(load_config(config, preset, [x for x in a if "=" in x and not x.startswith("--")]).train.out_dir)' \
        "${common[@]}")
    probe_dir="$out_dir/probe"
    blues-probe --nproc_per_node "$nproc" --deepspeed_config "$ds_config" --out_dir "$probe_dir" \
        "${probe[@]}" "${common[@]}"
    read -r micro grad_accum < <(python -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(r["micro_batch_size"], r["grad_accum"])' "$probe_dir/report.json")
    echo "launch/train.sh: training with micro_batch_size=$micro grad_accum=$grad_accum ($probe_dir/ds_config.json)"
    exec deepspeed "${launcher[@]}" --module blues.train --deepspeed_config "$probe_dir/ds_config.json" \
        "${common[@]}" "micro_batch_size=$micro" "grad_accum=$grad_accum" "${train_only[@]}"
fi
exec deepspeed "${launcher[@]}" --module blues.train --deepspeed_config "$ds_config" "${common[@]}" "${train_only[@]}"
