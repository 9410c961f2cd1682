"""spotfan's `fab` commands for a checkout: they live in cluster.cli (an installed spotfan runs them as `spotfan`)."""
from cluster.cli import (  # noqa: F401  (Fabric collects the tasks of this module)
    collect,
    down,
    exec_,
    failures,
    head_setup,
    heal,
    logs,
    preempt,
    pull,
    push,
    report,
    run,
    status,
    top,
    up,
)
