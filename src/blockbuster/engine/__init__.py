"""The run engine: one pipeline, whatever executes the tiles.

plan (:mod:`blockbuster.plan`) -> segment tiles (:mod:`~blockbuster.engine.executors`: this
process, threads, or dask.distributed workers) -> assign global labels in grid order and write
each core once (:mod:`~blockbuster.engine.commit`) -> the end pass, verify, finalize
(:mod:`~blockbuster.engine.run`). The run's durable state is :mod:`~blockbuster.engine.state`.

Nothing is imported here (the tile tasks import the state module, and the executors import the
tasks): import the submodules.
"""
