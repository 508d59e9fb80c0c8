#!/bin/sh
# convfuse-gate.sh: fuse a model, verify it, and decide whether it may be deployed.
#
# Usage:  examples/ci/convfuse-gate.sh MODEL OUTPUT REPORT.json [convfuse options...]
#   e.g.  examples/ci/convfuse-gate.sh model.pt fused.pt report.json --input-shape 1,3,224,224 --strict
#
# Runs `convfuse MODEL -o OUTPUT --report REPORT.json [options]`; options after the third
# argument go to convfuse unchanged (--input-shape, --strict, --atol/--rtol, --arch, ...).
# Exits with convfuse's own code, so any CI fails the job on anything but 0:
#   0  the fused model was verified and written: deploy OUTPUT
#   1  the model failed a check (verification, or --strict with BatchNorm left): block the
#      deployment; nothing was written; REPORT.json says why
#   2  a configuration problem (arguments, an unreadable or unsafe model file, an unwritable
#      output): fix the pipeline; nothing was written, and REPORT.json may be missing
# CONVFUSE names the command to run (default: convfuse), e.g. CONVFUSE="python -m convfuse".
# Plain POSIX sh; on GitHub Actions the verdict is also shown as an annotation.

set -u

if [ "$#" -lt 3 ]; then
    echo "usage: $0 MODEL OUTPUT REPORT.json [convfuse options...]" >&2
    exit 2
fi
model=$1
output=$2
report=$3
shift 3

say() {  # say LEVEL MESSAGE: to stderr, and as a GitHub Actions annotation where there is one
    if [ "${GITHUB_ACTIONS:-}" = "true" ]; then
        echo "::$1 title=convfuse gate::$2"
    fi
    echo "convfuse-gate: $2" >&2
}

# CONVFUSE is split into words on purpose: it may be a command with arguments.
# shellcheck disable=SC2086
${CONVFUSE:-convfuse} "$model" -o "$output" --report "$report" "$@"
code=$?

case $code in
    0) say notice "PASS: $output is verified to compute what $model computes; deploy it (report: $report)" ;;
    1) say error "BLOCKED: $model failed a check (verification, or --strict); nothing was written; do not deploy. See $report" ;;
    2) say error "CONFIGURATION PROBLEM: fix the arguments or the input named above; nothing was written" ;;
    *) say error "convfuse exited with code $code (internal error or interrupted); nothing deployed" ;;
esac
exit "$code"
