# What the scientific stack calls: numpy (BLAS/LAPACK threads), pandas, matplotlib (Agg, fonts,
# PNG and SVG output). Run by scripts/seccomp-measure when the packages are installed.
import json

import numpy as np

a = np.random.default_rng(0).random((200, 200))
inv = np.linalg.inv(a @ a.T + np.eye(200))
eig = np.linalg.eigvalsh(inv[:50, :50])
import pandas as pd

df = pd.DataFrame({"k": np.arange(1000) % 7, "v": np.arange(1000.0)})
g = df.groupby("k")["v"].agg(["sum", "mean"])
df.to_csv("frame.csv")
back = pd.read_csv("frame.csv")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots()
ax.plot(np.arange(10), np.arange(10) ** 2)
ax.set_title("squares")
fig.savefig("plot.png")
fig.savefig("plot.svg")
json.dump({"eig": float(eig.sum()), "groups": len(g), "rows": len(back)}, open("output.json", "w"))
