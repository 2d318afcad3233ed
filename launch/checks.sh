# Shared by the launch scripts (sourced): how they report a bad launcher variable, the same way `moe-dist`
# reports every error (one `moe-dist: <kind> error: <what happened>; <the fix>` line on stderr, exit 2).
# slurm.sbatch keeps its own copy: sbatch runs a spooled copy of the script, from which this file's path is not
# known.

# die MESSAGE: the launch's one error line, exit 2 (bad input).
die() {
    echo "moe-dist: launch error: $*" >&2
    exit 2
}

# need_int NAME MIN [MAX] WHAT: $NAME holds a whole number in MIN..MAX (no MAX: no upper bound). WHAT says what
# the variable means, for the message. Bash arithmetic would read "two" as an unset variable (0) and "08" as a
# bad octal number, so the text is checked first.
need_int() {
    local name=$1 min=$2 max=$3 what=$4 value=${!1-}
    if [[ ! $value =~ ^[0-9]+$ ]]; then
        die "$name='$value' is not a whole number; set $name to $what"
    fi
    value=$((10#$value))
    if (( value < min )); then
        die "$name=$value is below $min; set $name to $what"
    fi
    if [[ -n $max ]] && (( value > max )); then
        die "$name=$value is above $max; set $name to $what"
    fi
    printf -v "$name" '%d' "$value"      # 08 -> 8, as the programs that read it expect
}
