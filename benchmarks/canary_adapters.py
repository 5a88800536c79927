"""The drill's two adapters (`bench canary`): a good one trained on the users' rule, a bad one on its inverse.

Both with `bench ablate`'s on-policy loop (sample 32 answers, rate them by the rule, one `ppo_update`),
one process and one core each, both at once, the last version written as the learner writes versions.
Trained once per directory: trained.json records the plan, and a later drill with the same plan reuses
them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.ablate import run_arm
from benchmarks.common import worker_argv, worker_env
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

TRAIN_RESULT = "CANARY-TRAINED "


def train_adapters(directory: Path, rule: str, good_versions: int, bad_versions: int, seed: int) -> dict:
    """The good (``rule``) and bad (``not:rule``) adapters under ``directory``/{good,bad}, trained now unless
    there from an earlier run with the same settings; returns what each training measured."""
    plan = {
        "good": {"rule": rule, "versions": good_versions, "seed": seed},
        "bad": {"rule": f"not:{rule}", "versions": bad_versions, "seed": seed},
    }
    done = directory / "trained.json"
    if done.is_file():
        trained = json.loads(done.read_text())
        if all(trained.get(name, {}).get("plan") == spec for name, spec in plan.items()):
            print(f"[bench canary] reusing the adapters in {directory} (trained.json matches)", flush=True)
            return trained
        raise ValueError(f"{directory} holds adapters trained otherwise ({done}): give another --adapters")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty and has no trained.json: give another --adapters")
    directory.mkdir(parents=True, exist_ok=True)
    env = worker_env(OMP_NUM_THREADS="1", THUMBTUNE_NUM_THREADS="1")
    procs = {
        name: subprocess.Popen(
            worker_argv(
                "canary_adapters",
                spec["rule"],
                str(spec["versions"]),
                str(spec["seed"]),
                str(directory / name),
            ),
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, spec in plan.items()
    }
    trained: dict = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        line = next((ln for ln in stdout.splitlines() if ln.startswith(TRAIN_RESULT)), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(
                f"training the {name} adapter failed (exit {proc.returncode}); its log is above"
            )
        trained[name] = {"plan": plan[name], **json.loads(line.removeprefix(TRAIN_RESULT))}
    done.write_text(json.dumps(trained, indent=2))
    return trained


def _train_worker(argv: list[str]) -> None:
    import torch  # lazy: the drill's parent process never trains

    torch.set_num_threads(1)
    rule, versions, seed, store = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    result = run_arm(
        Settings(),
        {},
        rule=rule,
        versions=versions,
        batch_size=32,
        max_tokens=48,
        eval_every=versions,
        samples_per_prompt=1,
        seed=seed,
        store=store,
    )
    version = LocalAdapterStore(store).latest()
    print(TRAIN_RESULT + json.dumps({"version": version, **result}), flush=True)


if __name__ == "__main__":
    _train_worker(sys.argv[1:])
