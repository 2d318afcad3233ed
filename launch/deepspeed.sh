#!/usr/bin/env bash
# `moe-dist train` with train.engine=deepspeed (ZeRO-1/2, expert gradients over the expert-data-parallel
# group) under DeepSpeed's own launcher, which starts one process per GPU (or per slot of a CPU run).
#
#   [CONFIG=configs/x.yaml NUM_GPUS=8 ...] launch/deepspeed.sh [--section.field=value ...]
#
# One node:     NUM_GPUS=8 EP=8 CONFIG=configs/mixtral-tiny.yaml launch/deepspeed.sh --train.zero_stage=2
# CPU:          NUM_GPUS=2 EP=2 launch/deepspeed.sh --train.steps=50   (DS_ACCELERATOR=cpu when there is no GPU)
# Several nodes, from the first one (DeepSpeed reaches the others over passwordless ssh/pdsh):
#               HOSTFILE=launch/hostfile.example NNODES=2 MASTER_ADDR=node01 launch/deepspeed.sh
# Several nodes, the same command on each node without ssh: add NODE_RANK=<0..NNODES-1>.
# A DeepSpeed JSON of your own (its keys override the generated ones): --train.deepspeed_config=ds.json
#
# Every variable below has a default and may be overridden from the environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"

CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist; presets are in configs/ (set CONFIG=...)"
# The launcher of the active virtual environment, so deepspeed and moe_dist come from the same install.
DEEPSPEED=${DEEPSPEED:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/deepspeed}}
DEEPSPEED=${DEEPSPEED:-$(command -v deepspeed || true)}
[[ -n $DEEPSPEED ]] || die "no deepspeed launcher found; pip install 'moe-dist[deepspeed]' or set DEEPSPEED=/path/to/deepspeed"
NNODES=${NNODES:-1}
need_int NNODES 1 "" "the number of nodes, e.g. NNODES=2"
HOSTFILE=${HOSTFILE:-}
NODE_RANK=${NODE_RANK:-}
[[ -z $NODE_RANK ]] || need_int NODE_RANK 0 $((NNODES - 1)) "this node's rank, 0..$((NNODES - 1)) (NNODES=$NNODES)"
# Processes per node: NUM_GPUS, or NPROC_PER_NODE (torchrun's name), or one per GPU; one on a CPU machine.
NUM_GPUS=${NUM_GPUS:-${NPROC_PER_NODE:-}}
if [[ -z $NUM_GPUS ]]; then
    NUM_GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ ${NUM_GPUS:-0} -gt 0 ]] || NUM_GPUS=1
fi
need_int NUM_GPUS 1 "" "the number of processes per node, e.g. NUM_GPUS=2"
# One node: loopback. Several nodes: the host of rank 0; left empty with ssh, DeepSpeed asks the first host.
MASTER_ADDR=${MASTER_ADDR:-}
[[ $NNODES -eq 1 && -z $MASTER_ADDR ]] && MASTER_ADDR=127.0.0.1
MASTER_PORT=${MASTER_PORT:-29500}
need_int MASTER_PORT 1 65535 "a free TCP port on MASTER_ADDR"
# Parallel sizes: empty keeps the config's value; set, they become --parallel.* overrides.
EP=${EP:-}
[[ -z $EP ]] || need_int EP 1 "" "the expert-parallel size (parallel.ep), or leave it empty for the config's"
# PP is passed on so that the layout check refuses PP>1 with its reason (the DeepSpeed engine runs no pipeline).
PP=${PP:-}
[[ -z $PP ]] || need_int PP 1 "" "the pipeline stages (parallel.pp; DeepSpeed here: 1), or leave it empty"
# Without a GPU, DeepSpeed's CPU accelerator (gloo); CPU ranks share the cores, one thread each.
if ! nvidia-smi --list-gpus >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

nodes=()
if [[ -n $HOSTFILE ]]; then
    [[ -f $HOSTFILE ]] || die "HOSTFILE=$HOSTFILE does not exist; see launch/hostfile.example"
    nodes=(--hostfile="$HOSTFILE" --num_nodes="$NNODES")
    if [[ -n $NODE_RANK ]]; then
        [[ -n $MASTER_ADDR ]] || die "NODE_RANK (no ssh) needs MASTER_ADDR, the host of node rank 0"
        nodes+=(--no_ssh --node_rank="$NODE_RANK")
    fi
elif [[ $NNODES -gt 1 ]]; then
    die "NNODES=$NNODES needs HOSTFILE (one '<host> slots=<n>' line per node, see launch/hostfile.example)"
else
    # No hostfile on one node: DeepSpeed would look for /job/hostfile; point it at nothing explicitly.
    nodes=(--hostfile=/dev/null)
fi

sizes=()
[[ -n $EP ]] && sizes+=("--parallel.ep=$EP")
[[ -n $PP ]] && sizes+=("--parallel.pp=$PP")

[[ -n $MASTER_ADDR ]] && nodes+=(--master_addr="$MASTER_ADDR")

# Judge the layout on the world about to start, before the launcher starts anything (one error line, exit 2).
PYTHON=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
overrides=()
for arg in "$@"; do
    [[ $arg == --*=* ]] && overrides+=("$arg")      # train's own flags (--quiet, --debug) are not plan's
done
"$PYTHON" -m moe_dist.cli plan "$CONFIG" --world $((NNODES * NUM_GPUS)) --check --train.engine=deepspeed \
    "${sizes[@]}" "${overrides[@]}" || exit $?

set -x
exec "$DEEPSPEED" "${nodes[@]}" --num_gpus="$NUM_GPUS" --master_port="$MASTER_PORT" \
    --module moe_dist.cli train "$CONFIG" --train.engine=deepspeed "${sizes[@]}" "$@"
