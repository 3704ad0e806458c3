# Builds one virtual environment inside the sandbox (see environment.rs). Input: the target
# directory, the requirements and the installer settings. Output: the installed packages.
import json
import os
import subprocess
import sys

with open(os.environ["FLEETBOX_INPUT"]) as f:
    cfg = json.load(f)
env = cfg["dir"]
python = os.path.join(env, "bin", "python")


def run(argv):
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        # The installer's own words: they say which requirement failed and why.
        sys.stderr.write(done.stdout.strip() + "\n")
        sys.exit(1)
    return done.stdout


with open("requirements.txt", "w") as f:
    f.write("\n".join(cfg["requirements"]) + "\n")

source = []
if cfg.get("index_url"):
    source += ["--index-url", cfg["index_url"]]
if cfg.get("find_links"):
    source += ["--find-links", cfg["find_links"]]
if cfg.get("no_index"):
    source += ["--no-index"]

if cfg.get("uv"):
    run([cfg["uv"], "venv", "--quiet", "--python", sys.executable, env])
    run([cfg["uv"], "pip", "install", "--quiet", "--python", python, *source, "-r", "requirements.txt"])
else:
    run([sys.executable, "-m", "venv", "--without-pip", env])
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", *source, "-r", "requirements.txt"])

listed = run([python, "-I", "-c", (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted({(d.metadata['Name'], d.version) for d in m.distributions()})))"
)])
packages = [{"name": n, "version": v} for n, v in json.loads(listed)]
with open("output.json", "w") as f:
    json.dump({"packages": packages}, f)
