# Shared by torchrun.sh and mpirun.sh (sourced, so `shift` here consumes the caller's arguments):
# --help, the config argument, the venv's python, the sizes (checked as whole numbers), the TP/EP/ETP/PP overrides
# and CPU thread defaults. The caller sets USAGE (its variables) first. slurm.sbatch keeps its own copy: sbatch
# runs a spooled copy of the script, from which this file's path is not known.
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    echo "usage: ${USAGE:-} $0 [CONFIG] [--section.field=value ...]" >&2
    echo "  CONFIG: the first argument, else \$CONFIG, else configs/tiny-cpu.yaml; the rest are config overrides" >&2
    echo "  TP, EP, ETP, PP: parallel sizes (parallel.tp/ep/etp/pp: tensor, expert, expert-tensor, pipeline" >&2
    echo "  stages); empty keeps the config's. NNODES, NPROC_PER_NODE: the ranks (default: one per GPU)" >&2
    exit 0
fi
# The config: a first argument that is not an override, else $CONFIG (as launch/deepspeed.sh takes it).
if [[ $# -gt 0 && $1 != --* ]]; then
    CONFIG=$1
    shift
fi
CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist; presets are in configs/ (pass one as the first argument)"

# The interpreter of the active virtual environment, so the launcher and moe_dist come from the same install
# (every node must have it at the same path).
PYTHON=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
NNODES=${NNODES:-1}
need_int NNODES 1 "" "the number of nodes, e.g. NNODES=2"
GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
GPUS=${GPUS:-0}
# One process per GPU; on a machine without GPUs (a CPU run), one process unless told otherwise.
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$GPUS
    [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi
need_int NPROC_PER_NODE 1 "" "the number of ranks per node, e.g. NPROC_PER_NODE=2"
# Parallel sizes: empty keeps the config's value; set, they become --parallel.* overrides.
TP=${TP:-}
EP=${EP:-}
ETP=${ETP:-}
PP=${PP:-}
[[ -z $TP ]] || need_int TP 1 "" "the tensor-parallel size (parallel.tp), or leave it empty for the config's"
[[ -z $EP ]] || need_int EP 1 "" "the expert-parallel size (parallel.ep), or leave it empty for the config's"
[[ -z $ETP ]] || need_int ETP 1 "" "the expert tensor-parallel size (parallel.etp), or leave it empty for the config's"
[[ -z $PP ]] || need_int PP 1 "" "the pipeline stages (parallel.pp), or leave it empty for the config's"
sizes=()
[[ -n $TP ]] && sizes+=("--parallel.tp=$TP")
[[ -n $EP ]] && sizes+=("--parallel.ep=$EP")
[[ -n $ETP ]] && sizes+=("--parallel.etp=$ETP")
[[ -n $PP ]] && sizes+=("--parallel.pp=$PP")
# CPU runs: one intra-op thread per rank unless told otherwise (ranks share the node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
need_int OMP_NUM_THREADS 1 "" "the intra-op threads per rank, e.g. OMP_NUM_THREADS=1"

# Judge the layout on the world the launcher is about to start, before it starts anything: a bad layout is
# then one error line (the same `moe-dist: layout error: ...` that plan and train print) and exit code 2,
# instead of a message from every rank. Usage: check_layout WORLD [overrides...]
check_layout() {
    local world=$1 arg overrides=()
    shift
    # Only the config overrides: train's own flags (--quiet, --debug) are not plan's.
    for arg in "$@"; do
        [[ $arg == --*=* ]] && overrides+=("$arg")
    done
    "$PYTHON" -m moe_dist.cli plan "$CONFIG" --world "$world" --check "${sizes[@]}" "${overrides[@]}" || exit $?
}
