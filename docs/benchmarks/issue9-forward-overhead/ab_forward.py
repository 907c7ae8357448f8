import time, statistics, torch
import sys, os; sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
from paca_hpu.layer import PaCALinear, _PaCAFunction
torch.set_num_threads(1)
layer = PaCALinear(torch.randn(64, 64), None, torch.arange(8), 2.0)
x = torch.randn(2, 4, 64)
new = PaCALinear.forward
def old(self, x):
    return _PaCAFunction.apply(x, self.weight, self.bias, self.delta, self.indices, self.scaling)
res = {"old": [], "new": []}
for rnd in range(15):
    for name, fn in (("old", old), ("new", new)) if rnd % 2 else (("new", new), ("old", old)):
        PaCALinear.forward = fn
        t = time.perf_counter()
        for _ in range(2000):
            layer(x)
        res[name].append((time.perf_counter() - t) / 2000 * 1e6)
for k, v in res.items(): print(k, "median us/call", round(statistics.median(v), 2))
print("delta us/call", round(statistics.median([a - b for a, b in zip(res["new"], res["old"])]), 2))
