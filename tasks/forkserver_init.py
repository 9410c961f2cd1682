"""Imported only by multiprocessing's forkserver (as its preload module): the forkserver,
and through it every pool worker forked from it, dies with the runner that started it."""
from tasks.deathsig import die_with_parent

die_with_parent()
