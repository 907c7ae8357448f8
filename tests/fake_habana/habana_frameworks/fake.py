"""The fake plugin's event log: every call the code under test makes into the fake is appended to ``EVENTS``.

Events are tuples whose first item names the call: ``("mark_step",)``, ``("synchronize",)``,
``("hpu_graph_capture", module_name, n_graphs)``, ``("hpu_graph_replay", module_name)``,
``("hpu_graph_stale_address", module_name, tensor_name)``, ...  Tests may append their own events (forward,
backward, write-back) to the same list to check the order.
"""

EVENTS = []


def reset():
    EVENTS.clear()


def record(*event):
    EVENTS.append(tuple(event))


def kinds(events=None):
    """The event names in order, consecutive repeats collapsed (``[a, a, b, a] -> [a, b, a]``)."""
    out = []
    for ev in EVENTS if events is None else events:
        if not out or out[-1] != ev[0]:
            out.append(ev[0])
    return out
