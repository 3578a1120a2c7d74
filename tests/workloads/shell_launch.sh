#!/bin/bash
# A plain shell launcher, as people write them: N processes of one command, each with only
# its rank in the environment, nothing else (no torchrun, no TORCHELASTIC_* variables).
#
#   shell_launch.sh [--style plain|ompi|pmi] NPROC MASTER_PORT -- COMMAND [ARGS...]
#
# --style plain (default): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
# --style ompi: what Open MPI's mpirun gives its processes (OMPI_COMM_WORLD_RANK, _SIZE,
#   _LOCAL_RANK) plus MASTER_ADDR/MASTER_PORT exported by the user (mpirun -x), no RANK.
# --style pmi: MPICH / Intel MPI hydra's PMI_RANK, PMI_SIZE, MPI_LOCALRANKID (+ MASTER_*).
# SIGTERM/SIGINT to the launcher is passed on to every rank; it exits when they all did,
# with the first non-zero status.
set -u
style=plain
if [ "${1:-}" = "--style" ]; then style=$2; shift 2; fi
nproc=$1 port=$2
shift 2
[ "${1:-}" = "--" ] && shift
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK TORCHELASTIC_RUN_ID \
    OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK PMI_RANK PMI_SIZE \
    MPI_LOCALRANKID
export MASTER_ADDR=127.0.0.1 MASTER_PORT=$port
pids=()
for ((r = 0; r < nproc; r++)); do
    case $style in
    plain) RANK=$r WORLD_SIZE=$nproc LOCAL_RANK=$r "$@" & ;;
    ompi) OMPI_COMM_WORLD_RANK=$r OMPI_COMM_WORLD_SIZE=$nproc OMPI_COMM_WORLD_LOCAL_RANK=$r "$@" & ;;
    pmi) PMI_RANK=$r PMI_SIZE=$nproc MPI_LOCALRANKID=$r "$@" & ;;
    *) echo "shell_launch.sh: unknown --style $style (plain, ompi, pmi)" >&2; exit 2 ;;
    esac
    pids+=($!)
done
stop() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap stop TERM INT
status=0
for p in "${pids[@]}"; do
    # `wait` returns early (>128) when a trapped signal arrives: wait again for the same PID
    while :; do
        wait "$p"
        rc=$?
        kill -0 "$p" 2>/dev/null || break
    done
    [ $status -eq 0 ] && [ $rc -ne 0 ] && status=$rc
done
exit $status
