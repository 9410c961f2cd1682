#!/bin/sh
# The end-to-end test's task: `sh lab_work.sh SRC OUT`. Leaves one marker per execution
# (so every start is counted, even one a preemption kills), then writes OUT in five
# timed pieces, so a publish that is not atomic would show up as a torn output.
set -eu
mkdir -p starts
: > "starts/$(basename "$1").$(hostname).$$"
for i in 1 2 3 4 5; do
    cat "$1" >> "$2"
    sleep 0.1
done
