"""Expert placement, split by job:

- ``algorithms/``: pure functions and records, tensors in and out, no Ray and no files: the layout and the plan,
  topology and budget, load arithmetic, the policies (and their packing steps), layout arithmetic for elasticity, and
  the triggers that decide when to rebalance or scale.
- ``runtime/``: the placement controller (the only writer of the plan), its elastic half, its actor and the Ray
  wrapper, and the metrics it exports.
- ``offline/``: the simulator that replays load traces through the same policies and triggers, its plots and its
  command line (``moeray placement simulate | synth``).

What the runtime and the offline tools share stays here: ``config.py`` (the controller's settings, which the
triggers and the simulator read too), ``traces.py`` (load-trace files: the controller writes them, the simulator
replays them) and ``initial.py`` (plan files and the first layout).

NOTE: ``algorithms`` imports nothing from ``runtime`` or ``offline``, and neither of those imports the other.
"""
