"""Imported only by multiprocessing's forkserver (as its preload module): the forkserver,
and through it every pool worker forked from it, dies with the runner that started it."""
import tasks.memo  # noqa: F401  (preloaded, as when `import tasks` loaded every module: each worker
import tasks.runner  # noqa: F401  forked from here starts with them instead of importing them itself)
import tasks.status  # noqa: F401
from tasks.deathsig import die_with_parent

die_with_parent()
