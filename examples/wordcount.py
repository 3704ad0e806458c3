import json, os, re
from collections import Counter

shard = json.load(open(os.environ["FLEETBOX_INPUT"]))
counts = Counter()
for line in shard["lines"]:
    counts.update(w.lower() for w in re.findall(r"[A-Za-z']+", line))
with open("output.json", "w") as f:
    json.dump(counts, f)
