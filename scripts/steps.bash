# Sourced by scripts/setup and scripts/test (not run): names each step as it starts, with the
# time since the script started, and says at the end whether every step passed or which one
# failed. The sourcing script sets `script` to its name and `step` to what runs before its
# first section.

started=$SECONDS

elapsed() {
    local s=$((SECONDS - started))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

finish() {
    local status=$?
    echo
    if [[ $status -eq 0 ]]; then
        echo "==> $script: all steps passed in $(elapsed)"
    else
        echo "==> $script: FAILED during '$step' (exit $status) after $(elapsed)" >&2
    fi
}
trap finish EXIT

section() {
    step="$1"
    echo
    echo "==> [$(elapsed)] $1"
}
