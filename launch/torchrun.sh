#!/usr/bin/env bash
# `moe-dist train` under torchrun, on one node or several, with optional elastic restarts.
#
#   launch/torchrun.sh [CONFIG] [--section.field=value ...]      (CONFIG also from $CONFIG; default tiny-cpu)
#
# One node:   NPROC_PER_NODE=8 EP=8 launch/torchrun.sh configs/mixtral-tiny.yaml
# Two nodes:  the same command on each node (MASTER_ADDR: one of them, which hosts the rendezvous):
#             NNODES=2 MASTER_ADDR=node01 MASTER_PORT=29500 EP=8 TP=2 launch/torchrun.sh configs/mixtral-8x7b.yaml
# Pipeline:   NPROC_PER_NODE=8 PP=2 EP=4 launch/torchrun.sh configs/mixtral-tiny.yaml --train.grad_accum_steps=8
#             (PP stages of world/PP ranks each; at least PP micro-batches per step keep the pipeline busy)
# Restarts:   MAX_RESTARTS=3 restarts every worker after a failure; the trainer resumes from the latest
#             checkpoint (checkpoint.resume=auto, so set checkpoint.every for a recent one).
#
# torchrun's agent runs through moe_dist.parallel.torchrun_agent, which reports the launch's own failures as one
# `moe-dist: launch error:` line: a MASTER_PORT held by another program (refused at once instead of a silent
# wait), a rendezvous that does not complete within RDZV_TIMEOUT seconds (naming the endpoint), a worker killed
# by a signal. The exit code is the workers' (2 bad input, 1 runtime failure), 143 after a SIGTERM save.
#
# Every variable below has a default and may be overridden from the environment.
set -euo pipefail

USAGE="[NNODES=N MASTER_ADDR=host MASTER_PORT=port]"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MASTER_ADDR_GIVEN=${MASTER_ADDR:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
# Empty on one node: torchrun --standalone picks a free port itself. Several nodes must agree on one
# (MASTER_ADDR:MASTER_PORT then hosts the c10d rendezvous store, on the node that has that address).
MASTER_PORT=${MASTER_PORT:-}
[[ -z $MASTER_PORT ]] || need_int MASTER_PORT 1 65535 "a free TCP port on MASTER_ADDR, or leave it unset on one node"
MAX_RESTARTS=${MAX_RESTARTS:-0}
need_int MAX_RESTARTS 0 "" "how many times to restart the workers after a failure (0: never)"
# Seconds the nodes have to meet before the launch fails naming the endpoint (torchrun's join_timeout).
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
need_int RDZV_TIMEOUT 1 "" "the seconds to wait for every node to join, e.g. RDZV_TIMEOUT=600"
# Seconds the workers have to save a checkpoint after the agent forwards a SIGTERM, before it kills them.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-60}
need_int SHUTDOWN_TIMEOUT 1 "" "the seconds the workers get to save after a SIGTERM, e.g. SHUTDOWN_TIMEOUT=60"
RDZV_ID=${RDZV_ID:-moe-dist-${SLURM_JOB_ID:-${USER:-job}}}

if [[ $NNODES -eq 1 && -z $MASTER_PORT ]]; then
    # One node: torchrun's own store on a port it picks, so no fixed port can be taken already.
    rdzv=(--standalone)
else
    if [[ -z $MASTER_PORT || ( $NNODES -gt 1 && -z $MASTER_ADDR_GIVEN ) ]]; then
        die "NNODES=$NNODES needs MASTER_ADDR (the host of node rank 0, reachable from every node) and" \
            "MASTER_PORT (a free port on it), the same on every node"
    fi
    # c10d rendezvous: the agent on MASTER_ADDR hosts the store at MASTER_ADDR:MASTER_PORT.
    # Node ranks are handed out by the rendezvous, so every node runs the same command.
    rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" "--rdzv-id=$RDZV_ID"
          "--rdzv-conf=join_timeout=$RDZV_TIMEOUT")
fi

check_layout $((NNODES * NPROC_PER_NODE)) "$@"
set -x
exec "$PYTHON" -m moe_dist.parallel.torchrun_agent --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --max-restarts="$MAX_RESTARTS" --shutdown-timeout="$SHUTDOWN_TIMEOUT" "${rdzv[@]}" \
    -m moe_dist.cli train "$CONFIG" "${sizes[@]}" "$@"
