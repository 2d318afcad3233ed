# Shared by torchrun.sh and mpirun.sh (sourced, so `shift` here consumes the caller's arguments):
# --help, the config argument, the venv's python, the TP/EP/ETP overrides and CPU thread defaults.
# The caller sets USAGE (its variables) first. slurm.sbatch keeps its own copy: sbatch runs a spooled copy of
# the script, from which this file's path is not known.

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    echo "usage: ${USAGE:-} $0 [CONFIG] [--section.field=value ...]" >&2
    echo "  CONFIG: the first argument, else \$CONFIG, else configs/tiny-cpu.yaml; the rest are config overrides" >&2
    exit 0
fi
# The config: a first argument that is not an override, else $CONFIG (as launch/deepspeed.sh takes it).
if [[ $# -gt 0 && $1 != --* ]]; then
    CONFIG=$1
    shift
fi
CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
if [[ ! -f $CONFIG ]]; then
    echo "$0: config file '$CONFIG' does not exist (presets are in configs/; pass one as the first argument)" >&2
    exit 2
fi

# The interpreter of the active virtual environment, so the launcher and moe_dist come from the same install
# (every node must have it at the same path).
PYTHON=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
NNODES=${NNODES:-1}
GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
GPUS=${GPUS:-0}
# One process per GPU; on a machine without GPUs (a CPU run), one process unless told otherwise.
NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS}
[[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
# Parallel sizes: empty keeps the config's value; set, they become --parallel.* overrides.
TP=${TP:-}
EP=${EP:-}
ETP=${ETP:-}
sizes=()
[[ -n $TP ]] && sizes+=("--parallel.tp=$TP")
[[ -n $EP ]] && sizes+=("--parallel.ep=$EP")
[[ -n $ETP ]] && sizes+=("--parallel.etp=$ETP")
# CPU runs: one intra-op thread per rank unless told otherwise (ranks share the node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Judge the layout on the world the launcher is about to start, before it starts anything: a bad layout is
# then one error line (the same `moe-dist: layout error: ...` that plan and train print) and exit code 2,
# instead of a message from every rank. Usage: check_layout WORLD [overrides...]
check_layout() {
    local world=$1
    shift
    "$PYTHON" -m moe_dist.cli plan "$CONFIG" --world "$world" --check "${sizes[@]}" "$@" || exit $?
}
